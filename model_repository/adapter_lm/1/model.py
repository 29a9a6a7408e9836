"""Multi-adapter LM, token level: each batch may mix adapters and the bare base; one batched generation
serves it, and every request gets its own response or its own typed error (backend_src/triton_lm.py)."""

import os
import sys
from pathlib import Path

# backend_src/ sits beside model_repository/; MULTIADAPTER_BACKEND_SRC overrides (e.g. in an image).
_SRC = os.environ.get("MULTIADAPTER_BACKEND_SRC") or str(Path(__file__).resolve().parents[3] / "backend_src")
sys.path.insert(0, _SRC)

from triton_lm import TritonPythonModel  # noqa: E402, F401
