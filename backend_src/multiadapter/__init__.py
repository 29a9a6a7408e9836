"""Multi-adapter serving core: a frozen base model, a bank of adapters, batched generation.

Pure PyTorch. Nothing in this package imports Triton; the Triton models under
`model_repository/` translate requests into the calls exposed here.
"""
