"""Training of the demo model: a tiny byte-level Llama that echoes its prompt, and LoRA adapters on it.

``python -m training.demo --out models/demo`` re-trains everything, seeded; see :mod:`training.demo`.
"""
