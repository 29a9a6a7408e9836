"""Detokenizer step of `generate`: output_ids -> text_output, `decode(ids, skip_special_tokens=True)`."""

import os
import sys
from pathlib import Path

# backend_src/ sits beside model_repository/; MULTIADAPTER_BACKEND_SRC overrides (e.g. in an image).
_SRC = os.environ.get("MULTIADAPTER_BACKEND_SRC") or str(Path(__file__).resolve().parents[3] / "backend_src")
sys.path.insert(0, _SRC)

import triton_python_backend_utils as pb_utils  # noqa: E402
from light_imports import without_torch  # noqa: E402

with without_torch():  # this step only tokenizes: it starts in a second without torch
    from triton_boundary import (  # noqa: E402
        bytes_tensor,
        error_response,
        exit_with_the_server,
        route_logging_to_triton,
        text_codec,
        token_ids,
    )


class TritonPythonModel:
    def initialize(self, args):
        route_logging_to_triton()
        exit_with_the_server()
        self.codec = text_codec(args)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = self.codec.decode(token_ids(request, "output_ids"))
            except Exception as exc:
                responses.append(error_response(exc))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[bytes_tensor("text_output", text)]))
        return responses
