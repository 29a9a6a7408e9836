"""`generate`: the non-streaming model, a thin front of `generate_stream` (which hosts the engine).

Why a front and not a second engine or an ensemble: Triton 2.51 answers plain HTTP `/infer` and gRPC infer
only for non-decoupled models, streams only from decoupled ones, and does not pass cancellation through an
ensemble. So `generate_stream` (decoupled) holds the one engine and its base model, and `generate`
(non-decoupled, torch-free) forwards each request to it through BLS with `stream` false and answers with its
one final response. `execute()` returns at once; an asyncio thread awaits the engine's answers, so requests
that arrive later join the engine's running batch.

Cancellation: every `CANCEL_POLL_S` the front checks whether its client has cancelled or passed its gRPC
deadline; if so it cancels the engine's sequence by the secret key it gave it (BLS children cannot be
cancelled in 2.51), and the request ends with the engine's CANCELLED error.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from multiadapter.errors import InvalidRequest, RequestError, Unavailable
from triton_boundary import error_response, model_parameters, route_logging_to_triton, untagged_error

log = logging.getLogger("triton_front")

CANCEL_KEY = "multiadapter_cancel_key"  # the engine model's parameters (backend_src/triton_generate.py)
CANCEL = "multiadapter_cancel"
# Each is_cancelled() is a round trip to the Triton process: asked every CANCEL_POLL_S per request in flight.
CANCEL_POLL_S = 0.5
DEFAULT_MAX_IN_FLIGHT = 160
GAUGE_INTERVAL_S = 0.25
INPUTS = ("text_input", "adapter_id", "max_tokens", "temperature", "top_p", "top_k", "seed")
OUTPUTS = ("text_output", "adapter_id", "adapter_version", "generated_tokens")


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
        params = model_parameters(args)
        self.engine_model = params.get("engine_model") or "generate_stream"
        # Requests forwarded and not yet answered, at most: beyond it a request gets UNAVAILABLE at once (the
        # engine's own queue and rows would refuse it anyway, and the front stays responsive).
        self.max_in_flight = int(params.get("max_in_flight") or DEFAULT_MAX_IN_FLIGHT)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="generate-front", daemon=True)
        self._thread.start()
        self._in_flight: dict[int, object] = {}  # id -> response sender, for finalize
        self._lock = threading.Lock()
        # Its requests awaiting the engine: this series also tells the launcher's supervisor that this model
        # answers after execute() returned (a dead stub's requests are never answered: restart, not heal).
        self._family = pb_utils.MetricFamily(
            name="multiadapter_front_requests",
            description="Requests a front model has forwarded to its engine and not yet answered",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self._gauge = self._family.Metric(labels={"model": args["model_name"]})
        asyncio.run_coroutine_threadsafe(self._report_in_flight(), self._loop)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                inputs = forwarded_inputs(request)
            except RequestError as exc:
                sender.send(error_response(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            with self._lock:
                busy = len(self._in_flight) >= self.max_in_flight
                if not busy:
                    self._in_flight[id(sender)] = sender
            if busy:
                overload = Unavailable(
                    f"the engine's queue is full ({self.max_in_flight} requests in flight); retry later"
                )
                sender.send(error_response(overload), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            # Only the sender outlives execute(): Triton frees the request itself once execute() returns, and
            # touching it later corrupts the stub's heap (seen under load: "malloc(): unaligned fastbin").
            asyncio.run_coroutine_threadsafe(self._answer(sender, inputs), self._loop)
        return None

    async def _answer(self, sender, inputs) -> None:
        try:
            response = await self._generate(sender, inputs)
        except RequestError as exc:
            response = error_response(exc)
        except Exception as exc:  # noqa: BLE001 - the call itself failed: the engine cannot be reached
            response = error_response(Unavailable(f"{self.engine_model} is not available: {exc}"))
        with self._lock:
            if self._in_flight.pop(id(sender), None) is None:
                return  # finalize answered it already
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    async def _generate(self, sender, inputs) -> pb_utils.InferenceResponse:
        key = secrets.token_hex(16)
        child = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=inputs,
            requested_output_names=list(OUTPUTS),
            parameters={CANCEL_KEY: key},
        )
        answer = asyncio.ensure_future(child.async_exec(decoupled=True))
        cancel_sent = False
        while True:
            done, _ = await asyncio.wait({answer}, timeout=CANCEL_POLL_S)
            if done:
                break
            if not cancel_sent and self._client_cancelled(sender):
                cancel_sent = True
                await self._cancel(key, inputs)
        for response in answer.result():
            if (
                response.has_error()
                or pb_utils.get_output_tensor_by_name(response, "text_output") is not None
            ):
                return copied_response(response, self.engine_model)
        raise Unavailable(f"{self.engine_model} ended the request without an answer")

    def _client_cancelled(self, sender) -> bool:
        # Never ask once the request is answered (finalize may have): Triton 2.51 crashes on that question.
        # (No lock is held across the round trip to Triton.)
        with self._lock:
            if id(sender) not in self._in_flight:
                return False
        return sender.is_cancelled()

    async def _cancel(self, key: str, inputs) -> None:
        control = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[t for t in inputs if t.name() in ("text_input", "adapter_id")],
            requested_output_names=list(OUTPUTS),
            parameters={CANCEL: key},
        )
        for _ in await control.async_exec(decoupled=True):
            pass

    async def _report_in_flight(self) -> None:
        """The gauge of requests in flight, sent when it changed, at most every GAUGE_INTERVAL_S (each update
        is a round trip to Triton; none is made while a lock is held)."""
        reported = None
        while True:
            count = len(self._in_flight)
            if count != reported:
                try:
                    self._gauge.set(count)
                    reported = count
                except Exception:  # noqa: BLE001 - metrics never fail a request
                    log.exception("could not update a metric")
            await asyncio.sleep(GAUGE_INTERVAL_S)

    def finalize(self):
        # Normally nothing is left (Triton unloads a model once its requests are answered); whatever is,
        # ends with UNAVAILABLE so that no client waits for ever.
        with self._lock:
            left = list(self._in_flight.values())
            self._in_flight.clear()
        for sender in left:
            sender.send(
                error_response(Unavailable("the model is being unloaded")),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
