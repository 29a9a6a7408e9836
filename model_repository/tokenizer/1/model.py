"""Tokenizer step of `generate`: text_input (UTF-8 bytes) -> input_ids, exactly `tokenizer(text)`."""

import os
import sys
from pathlib import Path

# backend_src/ sits beside model_repository/; MULTIADAPTER_BACKEND_SRC overrides (e.g. in an image).
_SRC = os.environ.get("MULTIADAPTER_BACKEND_SRC") or str(Path(__file__).resolve().parents[3] / "backend_src")
sys.path.insert(0, _SRC)

import triton_python_backend_utils as pb_utils  # noqa: E402
from light_imports import without_torch  # noqa: E402

with without_torch():  # this step only tokenizes: it starts in a second without torch
    from multiadapter.errors import RequestError  # noqa: E402
    from triton_boundary import (  # noqa: E402
        error_response,
        exit_with_the_server,
        ids_tensor,
        required_bytes,
        route_logging_to_triton,
        text_codec,
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
                ids = self.codec.encode(required_bytes(request, "text_input"))
            except RequestError as exc:
                responses.append(error_response(exc))
                continue
            responses.append(pb_utils.InferenceResponse(output_tensors=[ids_tensor("input_ids", ids)]))
        return responses
