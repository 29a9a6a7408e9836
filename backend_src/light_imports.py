"""Imports for the steps that only tokenize: transformers without torch.

transformers imports torch whenever it is installed, which costs a tokenizer step several seconds at every
start (most of a restarted server's wait on a small machine). `USE_TORCH=0` while transformers is first
imported keeps it out; the variable is restored afterwards, so nothing else in the process (or a test that
imports these models beside others) inherits it.
"""

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def without_torch() -> Iterator[None]:
    """Within the block, a first import of transformers leaves torch out (no effect if it is loaded)."""
    saved = {name: os.environ.get(name) for name in ("USE_TORCH", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
    os.environ["USE_TORCH"] = "0"
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"  # its note that no framework is installed
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
