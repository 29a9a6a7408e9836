"""`generate_stream`: hosts the engine (the base model and its adapter bank) and streams text as it is
generated; `generate` answers through it (backend_src/triton_generate.py)."""

import os
import sys
from pathlib import Path

# backend_src/ sits beside model_repository/; MULTIADAPTER_BACKEND_SRC overrides (e.g. in an image).
_SRC = os.environ.get("MULTIADAPTER_BACKEND_SRC") or str(Path(__file__).resolve().parents[3] / "backend_src")
sys.path.insert(0, _SRC)

from triton_generate import TritonPythonModel  # noqa: E402, F401
