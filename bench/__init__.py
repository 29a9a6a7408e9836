"""Benchmarks of the multi-adapter core (`backend_src/multiadapter`) on CPU, reported against field.md.

``python -m bench`` (``make bench``) builds a seeded bench-size Llama with eight PEFT LoRA adapters and one
AdapterHub bottleneck adapter per preset (seq_bn, double_seq_bn, par_bn), all served from one bank, measures
the machine (per-op overhead, matmul FLOP/s, streaming bandwidth), then times, side by side:

- (a) one batched generation with distinct adapters per row vs every row on one adapter (goal >= 0.90), and
  a batch mixing LoRA, bottleneck and base rows vs every row on one adapter (goal >= 0.90);
- (b) one decode step with an unmerged LoRA adapter, or with one bottleneck adapter of each preset, vs the
  bare Hugging Face model (goal <= 1.15), and base rows through the engine vs the bare model (the wrappers'
  and hooks' own cost);
- (c) a decode step with k distinct adapters vs one, read against the bound 1 + (k-1)·dW/W.

Results go to stdout and to <out>/results.md and <out>/results.json. ``--quick`` is a smoke run.
"""

import sys
from pathlib import Path

# The serving core is a plain source tree, not an installed package.
_BACKEND_SRC = str(Path(__file__).resolve().parents[1] / "backend_src")
if _BACKEND_SRC not in sys.path:
    sys.path.insert(0, _BACKEND_SRC)
