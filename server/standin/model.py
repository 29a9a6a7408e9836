"""Stand-in for a Python model whose stub died or hung, loaded by the launcher in the model's place (same
name, inputs and outputs) while the real model loads again: every request gets UNAVAILABLE at once with the
reason, instead of Triton's INTERNAL "Stub process ... is not healthy" after a second's wait.

It needs nothing but Triton's Python backend (no torch), so it is ready within about a second.
"""

import json

import triton_python_backend_utils as pb_utils

MESSAGE_PARAMETER = "standin_message"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        parameter = config.get("parameters", {}).get(MESSAGE_PARAMETER, {})
        default = f"model '{config['name']}' is restarting; retry shortly"
        self.message = parameter.get("string_value") or default

    def _error(self):
        return pb_utils.TritonError(self.message, pb_utils.TritonError.UNAVAILABLE)

    def execute(self, requests):
        # A TritonError of its own for each response: one error shared by the responses of a batch crashes
        # tritonserver 2.51 (the Python backend reads it back from freed shared memory).
        responses = [pb_utils.InferenceResponse(error=self._error()) for _ in requests]
        if not self.decoupled:
            return responses
        for request, response in zip(requests, responses, strict=True):
            request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
