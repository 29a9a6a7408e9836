"""`generate`: the non-streaming model, a thin front of `generate_stream` (which hosts the engine).

Why a front and not a second engine or an ensemble: Triton 2.51 answers plain HTTP `/infer` and gRPC infer
only for non-decoupled models, streams only from decoupled ones, and does not pass cancellation through an
ensemble. So `generate_stream` (decoupled) holds the one engine and its base model, and `generate`
(non-decoupled, torch-free) forwards each request to it through BLS with `stream` false and answers with its
one final response.

`execute` is `async` and awaits BLS `async_exec` on the stub's own event loop, the way the Python backend
supports (two other ways crashed the 2.51 stub under load: an asyncio loop of our own thread, and blocking
`exec` from pool threads). A non-decoupled model runs one `execute` at a time per instance, so each instance
takes one request (`max_batch_size` 1) and the model has as many instances as the engine has rows: requests
that arrive while others run go to another instance and join the engine's running batch; beyond that they wait
in Triton's bounded queue.

Cancellation: while it waits, `execute` asks every `CANCEL_POLL_S` whether its client cancelled or passed its
gRPC deadline (the request is valid until `execute` returns); if so it cancels the engine's sequence by the
secret key it gave it (BLS children cannot be cancelled in 2.51), and the request ends with the engine's
CANCELLED error (tests/test_streaming.py checks it for a gRPC deadline).
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import numpy as np
import triton_python_backend_utils as pb_utils
from multiadapter.errors import InvalidRequest, RequestError, Unavailable
from triton_boundary import (
    CANCEL,
    CANCEL_KEY,
    LISTING,
    error_response,
    exit_with_the_server,
    model_parameters,
    request_parameters,
    route_logging_to_triton,
    untagged_error,
)

log = logging.getLogger("triton_front")

# Each is_cancelled() is a round trip to the Triton process: asked every CANCEL_POLL_S per request in flight.
CANCEL_POLL_S = 0.5
INPUTS = ("text_input", "adapter_id", "max_tokens", "temperature", "top_p", "top_k", "seed", "tenant_id")
OUTPUTS = ("text_output", "served_adapter_id", "adapter_version", "generated_tokens")


def forwarded_inputs(request) -> list[pb_utils.Tensor]:
    """Copies of the request's inputs (its tensors are freed once execute() returns), and `stream` false."""
    tensors = []
    for name in INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            tensors.append(pb_utils.Tensor(name, np.array(tensor.as_numpy(), copy=True)))
    if not any(t.name() == "text_input" for t in tensors):
        raise InvalidRequest("input text_input is required")
    batch = tensors[0].as_numpy().shape[0]
    tensors.append(pb_utils.Tensor("stream", np.zeros((batch, 1), dtype=np.bool_)))
    return tensors


def copied_response(response, engine_model: str) -> pb_utils.InferenceResponse:
    """The engine's final response as this model's own (new tensors, a new error object)."""
    if response.has_error():
        error = response.error()
        return pb_utils.InferenceResponse(error=untagged_error(error.message(), error.code(), engine_model))
    outputs = []
    for name in OUTPUTS:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise RuntimeError(f"the engine's answer has no {name}")
        outputs.append(pb_utils.Tensor(name, np.array(tensor.as_numpy(), copy=True)))
    return pb_utils.InferenceResponse(output_tensors=outputs)


class TritonPythonModel:
    def initialize(self, args):
        route_logging_to_triton()
        exit_with_the_server()
        self.engine_model = model_parameters(args).get("engine_model") or "generate_stream"

    async def execute(self, requests):
        return [await self._answer(request) for request in requests]

    async def _answer(self, request) -> pb_utils.InferenceResponse:
        try:
            return await self._generate(request, forwarded_inputs(request))
        except RequestError as exc:
            return error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the call itself failed: the engine cannot be reached
            return error_response(Unavailable(f"{self.engine_model} is not available: {exc}"))

    async def _generate(self, request, inputs) -> pb_utils.InferenceResponse:
        key = secrets.token_hex(16)
        parameters: dict[str, object] = {CANCEL_KEY: key}
        if request_parameters(request).get(LISTING):
            parameters[LISTING] = True  # a listing request: the engine answers it at once
        child = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=inputs,
            requested_output_names=list(OUTPUTS),
            parameters=parameters,
        )
        answer = asyncio.ensure_future(child.async_exec(decoupled=True))
        cancel_sent = False
        while True:
            done, _ = await asyncio.wait({answer}, timeout=CANCEL_POLL_S)
            if done:
                break
            if not cancel_sent and request.is_cancelled():
                cancel_sent = True
                await self._cancel(key, inputs)
        for response in answer.result():
            if (
                response.has_error()
                or pb_utils.get_output_tensor_by_name(response, "text_output") is not None
            ):
                return copied_response(response, self.engine_model)
        raise Unavailable(f"{self.engine_model} ended the request without an answer")

    async def _cancel(self, key: str, inputs) -> None:
        control = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[t for t in inputs if t.name() in ("text_input", "adapter_id")],
            requested_output_names=list(OUTPUTS),
            parameters={CANCEL: key},
        )
        for _ in await control.async_exec(decoupled=True):
            pass
