"""The one place where Triton's Python-backend types meet the pure `multiadapter` package.

Imported only by `model_repository/*/1/model.py` inside the Triton stub. Maps typed errors to Triton
error codes, reads request tensors into Python values with shape checks, and builds responses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import triton_python_backend_utils as pb_utils
from multiadapter.adapter_metrics import OK, AdapterLabels, AdapterTally, RequestRecord
from multiadapter.environment import ENV_BASE_MODEL
from multiadapter.errors import ErrorKind, InvalidRequest, RequestError

if TYPE_CHECKING:  # the tokenizer steps never import torch, and `generate` not even transformers
    import torch
    from multiadapter.scheduler import StepResult
    from multiadapter.tokenization import TextCodec

# Attribute names, resolved at call time: the stub attaches TritonError to the module after import.
_CODES = {
    ErrorKind.INVALID_ARG: "INVALID_ARG",
    ErrorKind.NOT_FOUND: "NOT_FOUND",
    ErrorKind.UNAVAILABLE: "UNAVAILABLE",
    ErrorKind.CANCELLED: "CANCELLED",
    ErrorKind.INTERNAL: "INTERNAL",
}


# Triton 2.51 hands a BLS caller every error as INTERNAL and streams errors without their code (gRPC stream,
# SSE). `generate_stream` starts its messages with the code, "[NOT_FOUND] adapter 'x' does not exist", and
# its front `generate` restores the code from it (`untagged_error`); stream clients read it too.
_TAGGED = re.compile(r"\[([A-Z_]+)\] (.*)", re.DOTALL)


def error_response(exc: Exception, *, tag_code: bool = False) -> pb_utils.InferenceResponse:
    """A response that fails one request with the Triton code of `exc` (INTERNAL if untyped); with
    `tag_code`, the message also starts with the code's name (for `untagged_error`)."""
    if isinstance(exc, RequestError):
        name = _CODES[exc.kind]
        message = f"[{name}] {exc}" if tag_code else str(exc)
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, name))
        )
    logging.getLogger(__name__).exception("request failed with an unexpected error")
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(
            f"internal error: {type(exc).__name__}: {exc}", pb_utils.TritonError.INTERNAL
        )
    )


def untagged_error(message: str, code: int, callee: str) -> pb_utils.TritonError:
    """A new error for a BLS answer's `message` and `code`: the code tagged in the message, when `callee`
    tagged it. An untagged error comes from Triton, not from the callee's code: the callee is not loaded
    (being restarted, or the server stops), which is UNAVAILABLE for the caller's client."""
    match = _TAGGED.fullmatch(message)
    if match and match.group(1) in _CODES.values():
        return pb_utils.TritonError(match.group(2), getattr(pb_utils.TritonError, match.group(1)))
    if code == pb_utils.TritonError.NOT_FOUND:
        return pb_utils.TritonError(f"{callee} is not available: {message}", pb_utils.TritonError.UNAVAILABLE)
    return pb_utils.TritonError(message, code)


# Request parameters between `generate` (the front) and `generate_stream` (the engine's host):
CANCEL_KEY = "multiadapter_cancel_key"  # a secret the caller may cancel this request by
CANCEL = "multiadapter_cancel"  # a control request: cancel the request with this key
LISTING = "multiadapter_adapters"  # a control request: the adapter cache's listing (JSON in text_output)


def request_parameters(request) -> dict[str, object]:
    """The request's parameters (from the client or a BLS caller) as a dict; {} when there are none."""
    try:
        parsed = json.loads(request.parameters() or "{}")
    except (TypeError, ValueError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def model_parameters(args: Mapping[str, str]) -> dict[str, str]:
    """The string parameters of the model's config.pbtxt."""
    config = json.loads(args["model_config"])
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def instance_device(args: Mapping[str, str]) -> torch.device:
    """CUDA device of a KIND_GPU instance when CUDA is available, else the CPU."""
    import torch

    if args.get("model_instance_kind") == "GPU" and torch.cuda.is_available():
        return torch.device("cuda", int(args.get("model_instance_device_id", "0")))
    return torch.device("cpu")


def _one_element(request: pb_utils.InferenceRequest, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    array = tensor.as_numpy()
    if array.size != 1:
        raise InvalidRequest(
            f"{name} must hold exactly one element per request, got shape {list(array.shape)}"
        )
    return array.reshape(-1)


def required_bytes(request: pb_utils.InferenceRequest, name: str) -> bytes:
    array = _one_element(request, name)
    if array is None:
        raise InvalidRequest(f"input {name} is required")
    value = array[0]
    return value if isinstance(value, bytes) else str(value).encode("utf-8")


def optional_text(request: pb_utils.InferenceRequest, name: str) -> str | None:
    """The UTF-8 text of an optional one-element BYTES input, or None when the client left it out."""
    array = _one_element(request, name)
    if array is None:
        return None
    value = array[0]
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"{name} is not valid UTF-8") from None


def optional_scalar(request: pb_utils.InferenceRequest, name: str, kind: type) -> Any:
    """int / float value of an optional one-element input, or None when the client left it out."""
    array = _one_element(request, name)
    return None if array is None else kind(array[0].item())


def token_ids(request: pb_utils.InferenceRequest, name: str) -> list[int]:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidRequest(f"input {name} is required")
    return tensor.as_numpy().reshape(-1).astype(np.int64).tolist()


def bytes_tensor(name: str, value: bytes | str) -> pb_utils.Tensor:
    """A [1, 1] BYTES output."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return pb_utils.Tensor(name, np.array([[raw]], dtype=np.object_))


def count_tensor(name: str, value: int) -> pb_utils.Tensor:
    """A [1, 1] INT32 output."""
    return pb_utils.Tensor(name, np.array([[value]], dtype=np.int32))


def ids_tensor(name: str, ids: list[int]) -> pb_utils.Tensor:
    """A [1, n] INT32 output."""
    return pb_utils.Tensor(name, np.asarray(ids, dtype=np.int32).reshape(1, -1))


# How often a stub looks for its tritonserver, and the exit status it leaves with when the server is gone.
SERVER_WATCH_INTERVAL_S = 0.02
ORPHAN_EXIT_CODE = 3
_server_watch_started = False


def exit_with_the_server() -> None:
    """Leave this stub process at once (`os._exit`) when its tritonserver is gone; call from `initialize`.

    When tritonserver dies (a crash, a kill, or its exit timeout under load), Triton 2.51's stub notices only
    once the server has been reaped, then tears itself down, and that teardown waits for a lock held by any
    thread still blocked sending to the dead server (a response sender's `send`, a metric's `increment`: the
    engine's responder and metric threads under load). The engine's stub then never exits and keeps the
    model's memory, a GPU's included: after SIGKILL under load, 4 engine stubs of 4 were left (backtraces:
    one thread in `Stub::TerminateStubToParentQueueMonitor` waiting on a mutex, others in
    `ResponseSender::Send` and `Metric::SendIncrementRequest`). A stub whose server is gone has nothing left
    to answer or to clean up (the launcher removes stale shared memory), so it exits without any teardown.
    The server's death shows here at once, as this process being re-parented, before it is even reaped.
    This is a Python thread: when Triton's teardown takes the GIL first and then blocks, it cannot run (1 run
    in 13 under test), and only killing the server's process group helps, as the launcher and
    `ServerProcess.stop` do."""
    global _server_watch_started
    if _server_watch_started:
        return
    _server_watch_started = True
    server = os.getppid()

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(SERVER_WATCH_INTERVAL_S)
        os._exit(ORPHAN_EXIT_CODE)

    threading.Thread(target=watch, name="server-watch", daemon=True).start()


class _TritonLogHandler(logging.Handler):
    """Forwards `logging` records to Triton's log, so library code never needs the Triton module."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            pb_utils.Logger.log_error(message)
        elif record.levelno >= logging.WARNING:
            pb_utils.Logger.log_warn(message)
        else:
            pb_utils.Logger.log_info(message)


def route_logging_to_triton(level: int = logging.INFO) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, _TritonLogHandler) for h in root.handlers):
        handler = _TritonLogHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)


class ServingMetrics:
    """The LM model's own Prometheus series on Triton's metrics endpoint (:8002/metrics).

    Labels stay bounded: batch composition (mixed / uniform), error code and loop state, never adapter ids.
    Triton counts a per-request error response as a success, so errors are counted here. With continuous
    batching, a batch is one decode step of the engine loop, and `multiadapter_engine_steps_total` and
    `multiadapter_engine_requests` are what the launcher's supervisor reads as the loop's progress.
    """

    FLUSH_INTERVAL_S = 0.25

    def __init__(self, model_name: str):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        batches = pb_utils.MetricFamily(
            name="multiadapter_batches_total",
            description="Batches computed in one forward pass (decode steps), by whether they mixed adapters",
            kind=counter,
        )
        rows = pb_utils.MetricFamily(
            name="multiadapter_batch_rows_total", description="Rows computed in batches", kind=counter
        )
        errors = pb_utils.MetricFamily(
            name="multiadapter_request_errors_total",
            description="Requests answered with an error",
            kind=counter,
        )
        steps = pb_utils.MetricFamily(
            name="multiadapter_engine_steps_total",
            description="Steps of the engine loop (a prefill chunk, a decode forward, or both)",
            kind=counter,
        )
        requests = pb_utils.MetricFamily(
            name="multiadapter_engine_requests",
            description="Requests in the engine loop, waiting for admission or running",
            kind=gauge,
        )
        # The families must outlive their metrics: Triton deletes a family's metrics with it.
        self._families = (batches, rows, errors, steps, requests)
        labels = {"model": model_name}
        self._batches = {c: batches.Metric(labels={**labels, "composition": c}) for c in ("mixed", "uniform")}
        self._rows = rows.Metric(labels=labels)
        self._errors = {k: errors.Metric(labels={**labels, "code": code}) for k, code in _CODES.items()}
        self._steps = steps.Metric(labels=labels)
        self._requests = {s: requests.Metric(labels={**labels, "state": s}) for s in ("waiting", "running")}
        self._last_requests: dict[str, int] = {}
        # Each update is a round trip to the Triton process: the loop's per-step counts are added up here and
        # sent at most every FLUSH_INTERVAL_S, and whenever the loop goes idle (so idle values are exact).
        self._pending = {"steps": 0, "mixed": 0, "uniform": 0, "rows": 0}
        self._flushed_at = time.monotonic()

    def record_batch(self, rows: int, adapters: int) -> None:
        """A batch of `rows` rows over `adapters` distinct adapters (the base counts as one)."""
        if rows:
            self._safely(self._batches["mixed" if adapters > 1 else "uniform"].increment, 1)
            self._safely(self._rows.increment, rows)

    def record_step(self, result: StepResult, waiting: int, running: int) -> None:
        """One step of the engine loop, and how many requests it holds afterwards."""
        pending = self._pending
        pending["steps"] += 1
        if result.rows:
            pending["mixed" if result.adapters > 1 else "uniform"] += 1
            pending["rows"] += result.rows
        idle = waiting == 0 and running == 0
        if not idle and time.monotonic() - self._flushed_at < self.FLUSH_INTERVAL_S:
            return
        self._flushed_at = time.monotonic()
        for name, metric in (("steps", self._steps), ("rows", self._rows), *self._batches.items()):
            if pending[name]:
                self._safely(metric.increment, pending[name])
                pending[name] = 0
        for state, count in (("waiting", waiting), ("running", running)):
            if self._last_requests.get(state) != count:
                self._last_requests[state] = count
                self._safely(self._requests[state].set, count)

    def record_error(self, exc: Exception) -> None:
        kind = exc.kind if isinstance(exc, RequestError) else ErrorKind.INTERNAL
        self._safely(self._errors[kind].increment, 1)

    @staticmethod
    def _safely(update, value: float) -> None:
        # Metrics never fail a request.
        try:
            update(value)
        except Exception:  # noqa: BLE001
            logging.getLogger(__name__).exception("could not update a metric")


def outcome_of(error: Exception | None) -> str:
    """A request's outcome label: "ok", or its error code's name (INVALID_ARG, NOT_FOUND, ...)."""
    if error is None:
        return OK
    return _CODES[error.kind if isinstance(error, RequestError) else ErrorKind.INTERNAL]


# Histogram buckets, seconds: whole requests (up to long generations on a CPU), and first tokens.
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
FIRST_TOKEN_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# The adapter cache's state (AdapterManager.counters): gauges, and totals exported as counters.
_CACHE_GAUGES = {
    "device_adapters": ("multiadapter_cache_adapters", {"tier": "device"}),
    "host_adapters": ("multiadapter_cache_adapters", {"tier": "host"}),
    "device_bytes": ("multiadapter_cache_bytes", {"tier": "device", "kind": "used"}),
    "device_budget": ("multiadapter_cache_bytes", {"tier": "device", "kind": "budget"}),
    "host_bytes": ("multiadapter_cache_bytes", {"tier": "host", "kind": "used"}),
    "host_budget": ("multiadapter_cache_bytes", {"tier": "host", "kind": "budget"}),
}
_CACHE_TOTALS = {
    "store_reads": "multiadapter_cache_store_reads_total",
    "store_read_seconds": "multiadapter_cache_store_read_seconds_total",
    "device_loads": "multiadapter_cache_device_loads_total",
    "evictions": "multiadapter_cache_evictions_total",
}


class AdapterMetrics:
    """Per-adapter series, and the adapter cache's state, on Triton's /metrics (README: Metrics).

    Requests are recorded from any thread (`record`, `refused`) and exported every EXPORT_INTERVAL_S (each
    update is a round trip to the Triton process) on `run_on` (the responder) or a timer thread of its own;
    each export also samples the cache (`cache_state`, when the model has an adapter cache). Label values are
    bounded by `AdapterLabels`.
    """

    EXPORT_INTERVAL_S = 0.25

    def __init__(
        self,
        model_name: str,
        labels: AdapterLabels,
        cache_state: Callable[[], Mapping[str, float]] | None = None,
        run_on: Callable[[Callable[[], None]], None] | None = None,
    ):
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        histogram = pb_utils.MetricFamily.HISTOGRAM
        described = {
            "multiadapter_adapter_requests_total": (counter, "Requests answered, by adapter and outcome"),
            "multiadapter_adapter_prompt_tokens_total": (counter, "Prompt tokens of answered requests"),
            "multiadapter_adapter_generated_tokens_total": (
                counter,
                "Tokens generated for answered requests",
            ),
            "multiadapter_adapter_request_duration_seconds": (
                histogram,
                "Time from a request's arrival at the engine's model to its final answer",
            ),
            "multiadapter_adapter_time_to_first_token_seconds": (
                histogram,
                "Time from a request's arrival at the engine's model to its first generated token",
            ),
            "multiadapter_cache_adapters": (gauge, "Adapters resident in a tier of the adapter cache"),
            "multiadapter_cache_bytes": (gauge, "Bytes of adapter tensors in a tier, used and budget"),
            "multiadapter_cache_store_reads_total": (counter, "Adapters read and validated from the store"),
            "multiadapter_cache_store_read_seconds_total": (counter, "Seconds spent reading adapters"),
            "multiadapter_cache_device_loads_total": (counter, "Adapters copied onto the device"),
            "multiadapter_cache_evictions_total": (counter, "Adapters evicted from the device"),
        }
        # The families must outlive their metrics: Triton deletes a family's metrics with it.
        self._families = {
            name: pb_utils.MetricFamily(name=name, description=text, kind=kind)
            for name, (kind, text) in described.items()
        }
        self._histograms = {name for name, (kind, _) in described.items() if kind == histogram}
        self._model = model_name
        self.labels = labels
        self._cache_state = cache_state
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._cache_seen: dict[str, float] = {}
        self._tally = AdapterTally()
        # Where exports run: the model's responder thread, so that these round trips to the Triton process
        # never overlap its response sends (None: on this class's own timer thread).
        self._run_on = run_on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="adapter-metrics", daemon=True)
        self._thread.start()

    def record(
        self,
        adapter_id: str,
        error: Exception | None,
        prompt_tokens: int,
        generated_tokens: int,
        started: float,
        first_token_at: float | None,
    ) -> None:
        """A request that `adapter_id` served (or was about to serve when it failed); times are monotonic."""
        now = time.monotonic()
        self._tally.add(
            RequestRecord(
                adapter=self.labels.served(adapter_id),
                outcome=outcome_of(error),
                prompt_tokens=prompt_tokens,
                generated_tokens=generated_tokens,
                duration_s=now - started,
                ttft_s=None if first_token_at is None else first_token_at - started,
            )
        )

    def refused(self, adapter_id: str | None, error: Exception, started: float) -> None:
        """A request refused before any adapter served it (`adapter_id`: what it asked for, if readable)."""
        self._tally.add(
            RequestRecord(
                self.labels.refused(adapter_id), outcome_of(error), 0, 0, time.monotonic() - started, None
            )
        )

    def stop(self) -> None:
        """Stop the exporter after a last export."""
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.EXPORT_INTERVAL_S):
            if self._run_on is None:
                self.export()
            else:
                self._run_on(self.export)
        self.export()

    def export(self) -> None:
        """Send what was recorded since the last export, and the cache's state. Never raises."""
        try:
            self._export_requests(self._tally.drain())
            if self._cache_state is not None:
                self._export_cache(self._cache_state())
        except Exception:  # noqa: BLE001 - metrics never take the server down
            logging.getLogger(__name__).exception("could not export adapter metrics")

    def _export_requests(self, records: list[RequestRecord]) -> None:
        counts: Counter[tuple[str, str]] = Counter()
        for r in records:
            counts["multiadapter_adapter_requests_total", r.adapter, r.outcome] += 1
            counts["multiadapter_adapter_prompt_tokens_total", r.adapter, ""] += r.prompt_tokens
            counts["multiadapter_adapter_generated_tokens_total", r.adapter, ""] += r.generated_tokens
            self._metric("multiadapter_adapter_request_duration_seconds", r.adapter).observe(r.duration_s)
            if r.ttft_s is not None:
                self._metric("multiadapter_adapter_time_to_first_token_seconds", r.adapter).observe(r.ttft_s)
        for (name, adapter, outcome), value in counts.items():
            if value:
                extra = {"outcome": outcome} if outcome else {}
                self._metric(name, adapter, **extra).increment(value)

    def _export_cache(self, state: Mapping[str, float]) -> None:
        for key, (name, labels) in _CACHE_GAUGES.items():
            if self._cache_seen.get(key) != state[key]:
                self._cache_seen[key] = state[key]
                self._metric(name, None, **labels).set(state[key])
        for key, name in _CACHE_TOTALS.items():
            metric = self._metric(name, None)  # made at the first export: a total of 0 is on /metrics too
            delta = state[key] - self._cache_seen.get(key, 0)
            if delta > 0:
                self._cache_seen[key] = state[key]
                metric.increment(delta)

    def _metric(self, name: str, adapter: str | None, **labels: str):
        """The metric of family `name` for these labels (made on first use)."""
        full = {"model": self._model, **({} if adapter is None else {"adapter": adapter}), **labels}
        key = (name, tuple(sorted(full.items())))
        metric = self._metrics.get(key)
        if metric is None:
            family = self._families[name]
            if name in self._histograms:
                buckets = FIRST_TOKEN_BUCKETS_S if "first_token" in name else DURATION_BUCKETS_S
                metric = family.Metric(labels=full, buckets=list(buckets))
            else:
                metric = family.Metric(labels=full)
            self._metrics[key] = metric
        return metric


def text_codec(args: Mapping[str, str]) -> TextCodec:
    """The base model's tokenizer for the tokenizer / detokenizer steps ($MULTIADAPTER_BASE_MODEL first)."""
    from light_imports import without_torch

    with without_torch():  # the tokenizer steps start without torch (no effect where it is loaded)
        from multiadapter.tokenization import TextCodec

    base = os.environ.get(ENV_BASE_MODEL) or model_parameters(args).get("base_model", "")
    return TextCodec.load(Path(base))
