"""`generate_stream`: the text-level model that hosts the engine (one copy of the base per instance).

It is decoupled. `execute()` only tokenizes and validates each request (a typed error answers that request
alone), hands it to the engine loop and returns; the loop computes, and a responder thread answers:

- `stream` true (the default): one response per step that adds text, each a valid UTF-8 delta
  (`multiadapter.streaming`), the last one flagged final with `finish_reason` stop / length; the deltas join
  to exactly the text `generate` answers.
- `stream` false: one final response with the whole text. `generate` (backend_src/triton_front.py) calls this
  model that way through BLS, so both models share this one engine.

Errors: every error message starts with its code, "[NOT_FOUND] adapter 'x' does not exist on this server",
since Triton 2.51 passes no code with a streamed error (gRPC stream, SSE) or a BLS answer.

Cancellation: a client that cancels its gRPC stream, disconnects from SSE or passes its deadline is noticed by
a poller (`triton_answers.CancelWatch`), its sequence is cancelled, the loop frees its row at the next step,
and the request ends with a CANCELLED error. BLS children cannot be cancelled in Triton 2.51, so a caller may
send a cancel key as a request parameter (`multiadapter_cancel_key`) and later cancel by it with a control
request carrying `multiadapter_cancel` (the key is a secret only that caller knows).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass

import triton_python_backend_utils as pb_utils
from multiadapter.adapter_ids import decode_adapter_id
from multiadapter.adapter_metrics import AdapterLabels
from multiadapter.config import EngineConfig
from multiadapter.engine import GenerationRequest, GenerationResult, Submitted, load_engine
from multiadapter.errors import Cancelled, RequestError
from multiadapter.loop import TorchThread
from multiadapter.scheduler import CANCELLED, Sequence
from multiadapter.streaming import TextStream, cleans_up_spaces
from multiadapter.tokenization import TextCodec
from triton_answers import CancelWatch, Responder
from triton_boundary import (
    CANCEL,
    CANCEL_KEY,
    LISTING,
    AdapterMetrics,
    ServingMetrics,
    bytes_tensor,
    count_tensor,
    error_response,
    exit_with_the_server,
    instance_device,
    model_parameters,
    optional_scalar,
    optional_text,
    request_parameters,
    required_bytes,
    route_logging_to_triton,
)

log = logging.getLogger("triton_generate")

EARLY_CANCELS_KEPT = 1024


@dataclass(frozen=True)
class TextRequest:
    generation: GenerationRequest
    stream: bool


def parse_text_request(request, codec: TextCodec) -> TextRequest:
    stream = optional_scalar(request, "stream", bool)
    return TextRequest(
        GenerationRequest(
            input_ids=codec.encode(required_bytes(request, "text_input")),
            adapter_id=decode_adapter_id(required_bytes(request, "adapter_id")),
            max_tokens=optional_scalar(request, "max_tokens", int),
            temperature=optional_scalar(request, "temperature", float),
            top_p=optional_scalar(request, "top_p", float),
            top_k=optional_scalar(request, "top_k", int),
            seed=optional_scalar(request, "seed", int),
            tenant_id=optional_text(request, "tenant_id"),
        ),
        stream=True if stream is None else stream,
    )


def requested_adapter(request) -> str | None:
    """The adapter id a request names, or None when it names none readable."""
    try:
        return decode_adapter_id(required_bytes(request, "adapter_id"))
    except RequestError:
        return None


def text_response(
    text: str, adapter_id: str, adapter_version: str, generated: int, finish_reason: str
) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[
            bytes_tensor("text_output", text),
            bytes_tensor("served_adapter_id", adapter_id),
            bytes_tensor("adapter_version", adapter_version),
            count_tensor("generated_tokens", generated),
            bytes_tensor("finish_reason", finish_reason),
        ]
    )


class _Reply:
    """One request's answers. The loop thread calls `on_tokens` / `on_finish`; the work of answering runs
    on the responder thread, in order, and ends with exactly one final response."""

    def __init__(
        self, model: TritonPythonModel, sender, item: Submitted, stream: bool, started: float | None
    ) -> None:
        self._model = model
        self._sender = sender
        self.item = item
        self._started = started  # time.monotonic() at arrival; None: not counted (the health canary)
        self._first_token_at: float | None = None
        self._text = (
            TextStream(model.codec.decode, hold_spaces=cleans_up_spaces(model.codec.tokenizer))
            if stream
            else None
        )
        self._answered = False
        self._pending: list[int] = []  # tokens not yet streamed, filled by the loop, taken by the responder
        self._pending_lock = threading.Lock()
        self._flush_queued = False
        # Guards the final send against a concurrent is_cancelled(): Triton 2.51 frees a request's response
        # factory with its final response, and asking it afterwards crashes the server.
        self._final_lock = threading.Lock()

    def is_cancelled(self) -> bool:
        """Whether the client cancelled, went away or passed its deadline (polled by the CancelWatch)."""
        with self._final_lock:
            return not self._answered and self._sender.is_cancelled()

    # --- the loop's thread ------------------------------------------------------------------------------

    def on_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        if self._first_token_at is None:
            self._first_token_at = time.monotonic()
        if self._text is None:
            return
        with self._pending_lock:
            self._pending.extend(tokens)
            if self._flush_queued:
                return  # the responder is behind: these tokens go out with the ones already waiting
            self._flush_queued = True
        self._model.responder.put(self._delta)

    def on_finish(self, seq: Sequence, error: Exception | None) -> None:
        self._model.responder.put(lambda: self._final(error))

    # --- the responder's thread ---------------------------------------------------------------------------

    def _delta(self) -> None:
        with self._pending_lock:
            tokens, self._pending, self._flush_queued = self._pending, [], False
        first = not self._text.ids
        text = self._text.push(tokens)
        # The first token is always reported (time to first token, even when its text is held back); later
        # steps only when they add text.
        if (text or first) and not self._answered:
            entry = self.item.entry
            self._send(text_response(text, entry.adapter_id, entry.version, len(self._text.ids), ""), flags=0)

    def _final(self, error: Exception | None) -> None:
        self._model.forget(self)
        if self._answered:
            return
        seq = self.item.seq
        if error is None and seq.finish_reason == CANCELLED:
            error = Cancelled(f"the request was cancelled after {len(seq.tokens)} generated tokens")
        try:
            response = self._final_response(error)
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer the request
            error = exc
            response = error_response(exc, tag_code=True)
        if error is not None:
            self._model.metrics.record_error(error)
        with self._final_lock:
            self._answered = True
            self._sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        if self._started is not None:
            self._count(error)

    def _final_response(self, error: Exception | None) -> pb_utils.InferenceResponse:
        if error is not None:
            return error_response(error, tag_code=True)
        seq, entry = self.item.seq, self.item.entry
        if self._text is not None:
            with self._pending_lock:
                self._pending.clear()  # the final text covers every token
            text = self._text.finish(seq.tokens[len(self._text.ids) :])
        else:
            text = self._model.codec.decode(seq.tokens)
        return text_response(text, entry.adapter_id, entry.version, len(seq.tokens), seq.finish_reason)

    def _count(self, error: Exception | None) -> None:
        """The answered request in the per-adapter metrics (after the answer: metrics never delay or fail
        it). A request whose adapter never loaded counts as refused for the id it was routed to."""
        seq, entry, metrics = self.item.seq, self.item.entry, self._model.adapter_metrics
        try:
            if entry is None:
                metrics.refused(self.item.adapter_id, error or Cancelled("no adapter"), self._started)
            else:
                metrics.record(
                    entry.adapter_id,
                    error,
                    len(seq.row.input_ids),
                    len(seq.tokens),
                    self._started,
                    self._first_token_at,
                )
        except Exception:  # noqa: BLE001
            log.exception("could not count a request in the adapter metrics")

    def _send(self, response, flags: int) -> None:
        self._sender.send(response, flags=flags)


class TritonPythonModel:
    def initialize(self, args):
        route_logging_to_triton()
        exit_with_the_server()
        config = EngineConfig.from_parameters(model_parameters(args))
        self.codec = TextCodec.load(config.base_model)
        # All torch work (the load, then every step) on one thread; see TorchThread.
        self.torch_thread = TorchThread("engine")
        self.engine = self.torch_thread.call(lambda: load_engine(config, instance_device(args)))
        self.metrics = ServingMetrics(args["model_name"])
        self.responder = Responder()
        self.adapter_metrics = AdapterMetrics(
            args["model_name"],
            AdapterLabels(config.metrics_adapter_series),
            self.engine.adapters.counters,
            run_on=self.responder.put,
        )
        self.watch = CancelWatch()
        self._by_key: dict[str, _Reply] = {}
        # Keys cancelled before their request arrived (the two travel separately): honoured on arrival.
        self._early_cancels: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._lock = threading.Lock()
        if config.batching == "continuous":
            self.engine.start_loop(on_step=self.metrics.record_step, thread=self.torch_thread)
        entries = self.engine.bank.entries()
        log.info(
            "serving %s on %s (%s), %s, with %d adapter(s): %s%s",
            config.base_model,
            self.engine.device,
            self.engine.dtype,
            f"continuous batching (up to {config.max_batch_rows} rows)"
            if self.engine.loop is not None
            else "request-level batching",
            len(entries),
            ", ".join(f"{e.adapter_id}={e.version}" for e in entries) or "none",
            f"; refused: {sorted(self.engine.refused)}" if self.engine.refused else "",
        )

    def execute(self, requests):
        if self.engine.loop is None:
            self._execute_to_the_end(requests)
            return None
        for request in requests:
            started = time.monotonic()
            sender = request.get_response_sender()
            params = request_parameters(request)
            try:
                if CANCEL in params:
                    self._cancel_by_key(str(params[CANCEL]))
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                if params.get(LISTING):
                    sender.send(self._listing(request), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                parsed = parse_text_request(request, self.codec)
                item = self.engine.sequence_for(parsed.generation)
            except RequestError as exc:
                self.metrics.record_error(exc)
                self.adapter_metrics.refused(requested_adapter(request), exc, started)
                response = error_response(exc, tag_code=True)
                sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            key = params.get(CANCEL_KEY)
            counted = not self.engine.is_canary(parsed.generation)  # probes stay out of the adapter series
            reply = _Reply(self, sender, item, parsed.stream, started if counted else None)
            if key:
                with self._lock:
                    self._by_key[str(key)] = reply
                    if str(key) in self._early_cancels:
                        del self._early_cancels[str(key)]
                        item.seq.cancelled = True  # retired at the loop's first step
            else:
                self.watch.watch(id(reply), reply, lambda item=item: self.engine.cancel(item))
            self.engine.enqueue(item, reply)
        return None

    def _listing(self, request) -> pb_utils.InferenceResponse:
        """The control request LISTING: the cache's listing as JSON in text_output. Raises RequestError."""
        listing = self.engine.listing(optional_text(request, "tenant_id"))
        return text_response(json.dumps(listing), "", "", 0, "listing")

    def forget(self, reply: _Reply) -> None:
        """`reply` is answered: stop watching it."""
        self.watch.forget(id(reply))
        with self._lock:
            for key in [k for k, r in self._by_key.items() if r is reply]:
                del self._by_key[key]

    def _cancel_by_key(self, key: str) -> None:
        with self._lock:
            reply = self._by_key.get(key)
            if reply is None:  # finished already, or not arrived yet: remember a bounded number of keys
                self._early_cancels[key] = None
                while len(self._early_cancels) > EARLY_CANCELS_KEPT:
                    self._early_cancels.popitem(last=False)
                return
        self.engine.cancel(reply.item)

    def _execute_to_the_end(self, requests) -> None:
        """Request-level batching (parameter batching=request): this batch generated to its end here, each
        request answered with one final response (no deltas)."""
        senders, parsed, positions = [], [], []
        started = time.monotonic()
        for i, request in enumerate(requests):
            senders.append(request.get_response_sender())
            try:
                params = request_parameters(request)
                if CANCEL in params:
                    senders[i].send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                    continue
                if params.get(LISTING):
                    senders[i].send(
                        self._listing(request), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
                    )
                    continue
                parsed.append(parse_text_request(request, self.codec).generation)
                positions.append(i)
            except RequestError as exc:
                self.metrics.record_error(exc)
                self.adapter_metrics.refused(requested_adapter(request), exc, started)
                response = error_response(exc, tag_code=True)
                senders[i].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        self.metrics.record_batch(len(parsed), len({p.adapter_id for p in parsed}))
        try:
            outcomes = self.torch_thread.call(lambda: self.engine.generate(parsed))
        except Exception as exc:  # a model-wide failure still answers every request once
            outcomes = [exc] * len(parsed)
        for i, request, outcome in zip(positions, parsed, outcomes, strict=True):
            counted = not self.engine.is_canary(request)
            if isinstance(outcome, GenerationResult):
                if counted:
                    self.adapter_metrics.record(
                        outcome.adapter_id,
                        None,
                        len(request.input_ids),
                        len(outcome.output_ids),
                        started,
                        None,
                    )
                response = text_response(
                    self.codec.decode(outcome.output_ids),
                    outcome.adapter_id,
                    outcome.adapter_version,
                    len(outcome.output_ids),
                    outcome.finish_reason,
                )
            else:
                self.metrics.record_error(outcome)
                if counted:
                    self.adapter_metrics.refused(request.adapter_id, outcome, started)
                response = error_response(outcome, tag_code=True)
            senders[i].send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        # Whatever is still queued or running ends with UNAVAILABLE (answered by the responder, which runs
        # what is queued before it stops): every request gets its one final response.
        self.watch.stop()
        self.engine.stop_loop()
        self.responder.stop()
        self.adapter_metrics.stop()
        self.torch_thread.stop()
        self.engine = None
