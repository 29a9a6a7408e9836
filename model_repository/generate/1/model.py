"""`generate`: the non-streaming contract over plain HTTP and gRPC infer, answered by the engine that
`generate_stream` hosts (backend_src/triton_front.py). It never imports torch or transformers."""

import os
import sys
from pathlib import Path

# backend_src/ sits beside model_repository/; MULTIADAPTER_BACKEND_SRC overrides (e.g. in an image).
_SRC = os.environ.get("MULTIADAPTER_BACKEND_SRC") or str(Path(__file__).resolve().parents[3] / "backend_src")
sys.path.insert(0, _SRC)

from triton_front import TritonPythonModel  # noqa: E402, F401
