"""The token-level LM model of the repository, shared by `adapter_lm` (the adapter bank: rows of any adapter
and the bare base share each step) and every merged-weight variant `merged_<id>` (one adapter folded into
the base, no bank). With continuous batching (the default), `execute()` only validates and queues each
request in the engine loop and returns; the loop answers each request later, through its response sender,
with exactly one final response or its own typed error. Only the `model.py` files import this; it is the
one place their Triton code lives.
"""

from __future__ import annotations

import logging

import triton_python_backend_utils as pb_utils
from multiadapter.adapter_ids import decode_adapter_id
from multiadapter.bank import BankEntry
from multiadapter.config import EngineConfig
from multiadapter.engine import GenerationRequest, GenerationResult, load_engine
from multiadapter.errors import RequestError
from multiadapter.loop import TorchThread
from multiadapter.scheduler import Sequence
from triton_boundary import (
    ServingMetrics,
    bytes_tensor,
    count_tensor,
    error_response,
    exit_with_the_server,
    ids_tensor,
    instance_device,
    model_parameters,
    optional_scalar,
    optional_text,
    required_bytes,
    route_logging_to_triton,
    token_ids,
)

log = logging.getLogger("triton_lm")


def parse_request(request) -> GenerationRequest:
    return GenerationRequest(
        input_ids=token_ids(request, "input_ids"),
        adapter_id=decode_adapter_id(required_bytes(request, "adapter_id")),
        max_tokens=optional_scalar(request, "max_tokens", int),
        temperature=optional_scalar(request, "temperature", float),
        top_p=optional_scalar(request, "top_p", float),
        top_k=optional_scalar(request, "top_k", int),
        seed=optional_scalar(request, "seed", int),
        tenant_id=optional_text(request, "tenant_id"),
    )


class _Reply:
    """Answers one request from the engine loop's thread: one final response through its sender."""

    def __init__(self, sender, entry: BankEntry, metrics: ServingMetrics) -> None:
        self._sender = sender
        self._entry = entry
        self._metrics = metrics

    def on_tokens(self, seq: Sequence, tokens: list[int]) -> None:
        pass  # `generate` answers once, at the end

    def on_finish(self, seq: Sequence, error: Exception | None) -> None:
        if error is not None:
            self._metrics.record_error(error)
            response = error_response(error)
        else:
            response = lm_response(
                GenerationResult(seq.tokens, self._entry.adapter_id, self._entry.version, seq.finish_reason)
            )
        self._sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def lm_response(outcome: GenerationResult) -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(
        output_tensors=[
            ids_tensor("output_ids", outcome.output_ids),
            bytes_tensor("served_adapter_id", outcome.adapter_id),
            bytes_tensor("adapter_version", outcome.adapter_version),
            count_tensor("generated_tokens", len(outcome.output_ids)),
        ]
    )


class TritonPythonModel:
    def initialize(self, args):
        route_logging_to_triton()
        exit_with_the_server()
        config = EngineConfig.from_parameters(model_parameters(args))
        # All torch work (the load, then every step) on one thread; see TorchThread.
        self.torch_thread = TorchThread("engine")
        self.engine = self.torch_thread.call(lambda: load_engine(config, instance_device(args)))
        self.metrics = ServingMetrics(args["model_name"])
        if config.batching == "continuous":
            # Requests are answered later, from the loop's thread; execute() only validates and queues.
            self.engine.start_loop(on_step=self.metrics.record_step, thread=self.torch_thread)
        self._log_start(config)

    def _log_start(self, config):
        batching = (
            f"continuous batching (up to {config.max_batch_rows} rows)"
            if self.engine.loop is not None
            else "request-level batching"
        )
        merged = self.engine.merged
        if merged is not None:
            log.info(
                "serving adapter %r %s merged into %s on %s (%s), %s",
                merged.adapter_id,
                merged.adapter_version,
                merged.base_model,
                self.engine.device,
                self.engine.dtype,
                batching,
            )
            return
        entries = self.engine.bank.entries()
        log.info(
            "serving %s on %s (%s), %s, with %d adapter(s): %s%s",
            config.base_model,
            self.engine.device,
            self.engine.dtype,
            batching,
            len(entries),
            ", ".join(f"{e.adapter_id}={e.version}" for e in entries) or "none",
            f"; refused: {sorted(self.engine.refused)}" if self.engine.refused else "",
        )

    def execute(self, requests):
        if self.engine.loop is None:
            return self._execute_to_the_end(requests)
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.engine.submit(parse_request(request), lambda entry, s=sender: self._reply(s, entry))
            except RequestError as exc:
                self.metrics.record_error(exc)
                sender.send(error_response(exc), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None

    def _reply(self, sender, entry: BankEntry) -> _Reply:
        return _Reply(sender, entry, self.metrics)

    def _execute_to_the_end(self, requests):
        """Request-level batching (parameter batching=request): this batch generated to its end here."""
        outcomes = [None] * len(requests)
        parsed, positions = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(parse_request(request))
                positions.append(i)
            except RequestError as exc:
                outcomes[i] = exc
        self.metrics.record_batch(len(parsed), len({p.adapter_id for p in parsed}))
        try:
            generated = self.torch_thread.call(lambda: self.engine.generate(parsed))
            for i, outcome in zip(positions, generated, strict=True):
                outcomes[i] = outcome
        except Exception as exc:  # a model-wide failure still answers every request once
            for i in positions:
                outcomes[i] = exc
        return [self._response(o) for o in outcomes]

    def _response(self, outcome):
        if not isinstance(outcome, GenerationResult):
            self.metrics.record_error(outcome)
            return error_response(outcome)
        return lm_response(outcome)

    def finalize(self):
        # Whatever is still queued or running ends with UNAVAILABLE: every request gets its one answer.
        self.engine.stop_loop()
        self.torch_thread.stop()
        self.engine = None
