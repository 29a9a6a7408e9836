"""Typed client for the `generate` model over tritonclient, HTTP or gRPC.

Every request tensor has shape [1, 1] (a batch of one; the model's config declares dims [1]).
Errors come back as `RequestFailed` with a Triton-style `.code`, whatever the protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import queue
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any, cast

import gevent
import numpy as np
import tritonclient.grpc
import tritonclient.http
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

DEFAULT_URLS = {"http": "localhost:8000", "grpc": "localhost:8001"}
_MODULES = {"http": tritonclient.http, "grpc": tritonclient.grpc}

# Optional inputs: request field == Triton input name, sent only when the field is not None.
OPTIONAL_INPUTS = (
    ("max_tokens", "INT32"),
    ("temperature", "FP32"),
    ("top_p", "FP32"),
    ("top_k", "INT32"),
    ("seed", "INT64"),
)
# The request parameter that asks the serving model for its adapter listing instead of text.
LISTING_PARAMETER = "multiadapter_adapters"
# served_adapter_id: the adapter that answered (with a tenant's default, not the request's adapter_id).
OUTPUTS = ("text_output", "served_adapter_id", "adapter_version", "generated_tokens")

# Triton's HTTP front end folds several core codes into one status: 2.51 answers 400 for INVALID_ARG,
# UNKNOWN, ALREADY_EXISTS and CANCELLED alike, so over HTTP those all read as INVALID_ARG.
_HTTP_STATUS_CODES = {
    "400": "INVALID_ARG",
    "401": "UNAUTHENTICATED",
    "403": "PERMISSION_DENIED",
    "404": "NOT_FOUND",
    "408": "DEADLINE_EXCEEDED",
    "500": "INTERNAL",
    "501": "UNSUPPORTED",
    "502": "UNAVAILABLE",
    "503": "UNAVAILABLE",
    "504": "DEADLINE_EXCEEDED",
}
_GRPC_STATUS_CODES = {
    "StatusCode.CANCELLED": "CANCELLED",
    "StatusCode.UNKNOWN": "UNKNOWN",
    "StatusCode.INVALID_ARGUMENT": "INVALID_ARG",
    "StatusCode.DEADLINE_EXCEEDED": "DEADLINE_EXCEEDED",
    "StatusCode.NOT_FOUND": "NOT_FOUND",
    "StatusCode.ALREADY_EXISTS": "ALREADY_EXISTS",
    "StatusCode.PERMISSION_DENIED": "PERMISSION_DENIED",
    "StatusCode.RESOURCE_EXHAUSTED": "RESOURCE_EXHAUSTED",
    "StatusCode.FAILED_PRECONDITION": "FAILED_PRECONDITION",
    "StatusCode.ABORTED": "ABORTED",
    "StatusCode.OUT_OF_RANGE": "OUT_OF_RANGE",
    "StatusCode.UNIMPLEMENTED": "UNSUPPORTED",
    "StatusCode.INTERNAL": "INTERNAL",
    "StatusCode.UNAVAILABLE": "UNAVAILABLE",
    "StatusCode.DATA_LOSS": "DATA_LOSS",
    "StatusCode.UNAUTHENTICATED": "UNAUTHENTICATED",
}
_STATUS_CODES = {**_HTTP_STATUS_CODES, **_GRPC_STATUS_CODES}


# A gRPC channel that lost its server retries with an exponential backoff that reaches two minutes, and fails
# every call meanwhile: a client would see a restarted server long after it is back. Retry every second at
# most, with tritonclient's own defaults otherwise (message sizes, keepalive).
RECONNECT_BACKOFF_MS = 1000


def grpc_channel_args() -> list[tuple[str, int]]:
    """Channel arguments for tritonclient.grpc: its defaults, with reconnection capped at one second."""
    keepalive = tritonclient.grpc.KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", tritonclient.grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", tritonclient.grpc.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 5),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS // 5),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
    ]


def error_code(status: str | None) -> str:
    """Triton-style code for an `InferenceServerException.status()` of either protocol.

    tritonclient.http reports the HTTP status ("404"), tritonclient.grpc the gRPC code
    ("StatusCode.NOT_FOUND"); client-side errors carry None. Anything unrecognised is "UNKNOWN".
    """
    return _STATUS_CODES.get(status or "", "UNKNOWN")


class RequestFailed(Exception):
    """One request's failure: `.code` is Triton-style ("NOT_FOUND", "INVALID_ARG", ...).

    `.status` keeps tritonclient's raw status ("404", "StatusCode.NOT_FOUND") or None when the
    failure happened in transport (refused connection, timeout).
    """

    def __init__(self, code: str, message: str, status: str | None = None) -> None:
        super().__init__(code, message, status)
        self.code = code
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """One generation request. `text` / `adapter_id` given as bytes are sent unchanged (even if not
    UTF-8); str is UTF-8 encoded. `adapter_id=""` selects the bare base model, or with a tenant policy on the
    server the tenant's default adapter; `tenant_id` is sent when set."""

    text: str | bytes
    adapter_id: str | bytes = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    tenant_id: str | bytes | None = None

    def __post_init__(self) -> None:
        problems = [
            f"{name} must be str or bytes, got {type(getattr(self, name)).__name__}"
            for name in ("text", "adapter_id")
            if not isinstance(getattr(self, name), (str, bytes))
        ]
        if self.tenant_id is not None and not isinstance(self.tenant_id, (str, bytes)):
            problems.append(f"tenant_id must be str or bytes, got {type(self.tenant_id).__name__}")
        for name, triton_dtype in OPTIONAL_INPUTS:
            problem = _check_scalar(name, getattr(self, name), triton_to_np_dtype(triton_dtype))
            if problem:
                problems.append(problem)
        if problems:
            raise ValueError("invalid GenerateRequest: " + "; ".join(problems))


def _check_scalar(name: str, value: object, np_dtype: type) -> str | None:
    """Why `value` cannot be sent as one `np_dtype` element, or None if it can (None: not sent)."""
    if value is None:
        return None
    if np.issubdtype(np_dtype, np.integer):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            return f"{name} must be an int, got {type(value).__name__}"
        info = np.iinfo(np_dtype)
        if not info.min <= int(value) <= info.max:
            return f"{name}={value} does not fit {np.dtype(np_dtype).name}"
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"{name} must be a number, got {type(value).__name__}"
    return None


@dataclasses.dataclass(frozen=True)
class GenerateResult:
    """One answer: its text, the adapter (id and content version) that served it, the latency seen by the
    client, and how many tokens the model generated (a stopping EOS included; 0 if the server did not say)."""

    text: str
    adapter_id: str
    adapter_version: str
    latency_s: float
    generated_tokens: int = 0


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


# The header a load balancer hashes on to keep each adapter on few replicas (docker/k8s/base/ingress.yaml).
ROUTING_HEADER = "x-adapter-id"
MAX_ROUTING_VALUE = 200


def routing_headers(request: GenerateRequest) -> dict[str, str]:
    """{ROUTING_HEADER: the request's adapter id, or "tenant:<id>" when it names none (its tenant's default
    serves it)}, percent-encoded so that any id makes a valid HTTP header and gRPC metadata value."""
    key = request.adapter_id
    if not key and request.tenant_id:
        tenant = request.tenant_id
        key = "tenant:" + (tenant.decode("utf-8", "replace") if isinstance(tenant, bytes) else tenant)
    if isinstance(key, bytes):
        key = key.decode("utf-8", "replace")
    value = urllib.parse.quote(key, safe=":._-~")
    if len(value) > MAX_ROUTING_VALUE:  # no real id is this long: keep the header small, still consistent
        value = "sha256:" + hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()
    return {ROUTING_HEADER: value}


def build_inputs(request: GenerateRequest, module: ModuleType) -> list[Any]:
    """The request's `InferInput`s for `module` (tritonclient.http or tritonclient.grpc).

    Shapes: every tensor [1, 1]; optional inputs appear only when their field is set.
    """
    tensors: list[tuple[str, str, object]] = [
        ("text_input", "BYTES", _as_bytes(request.text)),
        ("adapter_id", "BYTES", _as_bytes(request.adapter_id)),
    ]
    if request.tenant_id is not None:
        tensors.append(("tenant_id", "BYTES", _as_bytes(request.tenant_id)))
    tensors += [
        (name, triton_dtype, getattr(request, name))
        for name, triton_dtype in OPTIONAL_INPUTS
        if getattr(request, name) is not None
    ]
    inputs = []
    for name, triton_dtype, value in tensors:
        infer_input = module.InferInput(name, [1, 1], triton_dtype)
        infer_input.set_data_from_numpy(np.array([[value]], dtype=triton_to_np_dtype(triton_dtype)))
        inputs.append(infer_input)
    return inputs


@contextlib.contextmanager
def request_failures(url: str, protocol: str, timeout_s: float | None) -> Iterator[None]:
    """Turn tritonclient and transport exceptions raised inside into `RequestFailed`: the one place where
    either protocol's failures get their Triton-style code."""
    try:
        yield
    except InferenceServerException as exc:
        status = exc.status()
        raise RequestFailed(error_code(status), exc.message() or str(exc), status) from exc
    except TimeoutError as exc:
        raise RequestFailed("DEADLINE_EXCEEDED", f"no answer from {url} in {timeout_s} s") from exc
    except http.client.HTTPException as exc:  # e.g. the server closed the connection (it stopped)
        raise RequestFailed(
            "UNAVAILABLE", f"{protocol} server at {url} broke the connection: {exc!r}"
        ) from exc
    except OSError as exc:
        raise RequestFailed("UNAVAILABLE", f"cannot reach {protocol} server at {url}: {exc}") from exc


def output_count(result: Any, name: str) -> int:
    """The one INT value of output ``name`` of an InferResult (either protocol)."""
    array = result.as_numpy(name)
    if array is None or array.size != 1:
        raise RequestFailed("INTERNAL", f"response has no single-element output '{name}'")
    return int(array.reshape(-1)[0])


def output_text(result: Any, name: str) -> str:
    """The one UTF-8 BYTES value of output ``name`` of an InferResult (either protocol)."""
    array = result.as_numpy(name)
    if array is None or array.size != 1:
        raise RequestFailed("INTERNAL", f"response has no single-element output '{name}'")
    value = array.reshape(-1)[0]
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestFailed("INTERNAL", f"output '{name}' is not valid UTF-8: {exc}") from exc


_STAT_SECTIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)


def normalize_statistics(raw: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Flatten Triton's statistics JSON for `model_name`, summed over its versions.

    Accepts both protocols' shapes: gRPC's JSON has int64 values as strings and omits zero fields.
    Returns `inference_count`, `execution_count`, `<section>_count` / `<section>_ns` for each of
    `_STAT_SECTIONS`, and `batch_executions`: {batch size: executions at that size}.
    Note: Triton counts a Python-backend per-request error response as a *success*.
    """
    stats: dict[str, Any] = {"inference_count": 0, "execution_count": 0}
    for section in _STAT_SECTIONS:
        stats[f"{section}_count"] = 0
        stats[f"{section}_ns"] = 0
    batch_executions: dict[int, int] = {}
    for model in raw.get("model_stats", []):
        if model.get("name") != model_name:
            continue
        stats["inference_count"] += int(model.get("inference_count", 0))
        stats["execution_count"] += int(model.get("execution_count", 0))
        for section in _STAT_SECTIONS:
            duration = model.get("inference_stats", {}).get(section, {})
            stats[f"{section}_count"] += int(duration.get("count", 0))
            stats[f"{section}_ns"] += int(duration.get("ns", 0))
        for batch in model.get("batch_stats", []):
            size = int(batch.get("batch_size", 0))
            executions = int(batch.get("compute_infer", {}).get("count", 0))
            batch_executions[size] = batch_executions.get(size, 0) + executions
    stats["batch_executions"] = dict(sorted(batch_executions.items()))
    return stats


class AdapterClient:
    """Client for the `generate` model. Thread-safe: `generate` may be called from many threads.

    tritonclient.http is built on gevent and must not be shared across threads, so HTTP uses one
    underlying client per thread; the gRPC client is thread-safe and shared.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str = "http",
        model: str = "generate",
        timeout_s: float | None = 60.0,
    ) -> None:
        if protocol not in _MODULES:
            raise ValueError(f"protocol must be one of {sorted(_MODULES)}, got {protocol!r}")
        url = DEFAULT_URLS[protocol] if url is None else url
        if "://" in url:
            raise ValueError(f"url takes host:port without a scheme, got {url!r}")
        self.url = url
        self.protocol = protocol
        self.model = model
        self.timeout_s = timeout_s
        self._module = _MODULES[protocol]
        self._lock = threading.Lock()
        self._opened: list[Any] = []
        self._local = threading.local()
        self._closed = False

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AdapterClient(url={self.url!r}, protocol={self.protocol!r}, model={self.model!r})"

    def _open(self) -> Any:
        if self.protocol == "http":
            timeout = self.timeout_s
            return tritonclient.http.InferenceServerClient(
                self.url, connection_timeout=timeout, network_timeout=timeout
            )
        return tritonclient.grpc.InferenceServerClient(self.url, channel_args=grpc_channel_args())

    def _client(self) -> Any:
        """The underlying tritonclient client for the calling thread."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self.protocol == "grpc" and self._opened:
                return self._opened[0]
            client = getattr(self._local, "client", None)
            if client is None:
                client = self._open()
                self._opened.append(client)
                if self.protocol == "http":
                    self._local.client = client
            return client

    def _grpc_timeout(self) -> dict[str, float]:
        return {"client_timeout": self.timeout_s} if self.protocol == "grpc" and self.timeout_s else {}

    def _failures(self) -> contextlib.AbstractContextManager[None]:
        return request_failures(self.url, self.protocol, self.timeout_s)

    def generate(self, request: GenerateRequest) -> GenerateResult:
        """Send one request; raises `RequestFailed` for any server, transport or protocol error."""
        return self._generate_on(self._client(), request)

    def adapters(self, tenant_id: str | None = None) -> dict[str, Any]:
        """The serving model's adapter cache: every adapter of the store with its tier, kind, shape, version,
        bytes, pin and use, the budgets and their use (see `AdapterListing` in the engine). A control
        request to this client's model (parameter `multiadapter_adapters`); with a tenant policy the server
        lists only what `tenant_id` may use. Raises RequestFailed."""
        request = GenerateRequest("", "", tenant_id=tenant_id)
        inputs = build_inputs(request, self._module)
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        with self._failures():
            result = self._client().infer(
                self.model,
                inputs,
                outputs=outputs,
                parameters={LISTING_PARAMETER: True},
                **self._grpc_timeout(),
            )
        try:
            listing = json.loads(output_text(result, "text_output"))
        except ValueError as exc:
            raise RequestFailed("INTERNAL", f"the listing is not JSON: {exc}") from None
        if not isinstance(listing, dict) or not isinstance(listing.get("adapters"), list):
            raise RequestFailed("INTERNAL", "the listing has no adapters")
        return listing

    def generate_on_model(self, model: str, request: GenerateRequest) -> GenerateResult:
        """`generate` on another model of the same contract (e.g. `generate_merged_<id>`)."""
        return self._generate_on(self._client(), request, model)

    def _generate_on(self, client: Any, request: GenerateRequest, model: str | None = None) -> GenerateResult:
        inputs = build_inputs(request, self._module)
        outputs = [self._module.InferRequestedOutput(name) for name in OUTPUTS]
        start = time.perf_counter()
        with self._failures():
            result = client.infer(
                model or self.model,
                inputs,
                outputs=outputs,
                headers=routing_headers(request),
                **self._grpc_timeout(),
            )
        latency_s = time.perf_counter() - start
        return GenerateResult(
            text=output_text(result, "text_output"),
            adapter_id=output_text(result, "served_adapter_id"),
            adapter_version=output_text(result, "adapter_version"),
            latency_s=latency_s,
            generated_tokens=output_count(result, "generated_tokens"),
        )

    def generate_many(
        self, requests: Sequence[GenerateRequest], concurrency: int = 8
    ) -> list[GenerateResult | RequestFailed]:
        """Send `requests` with up to `concurrency` in flight; outcomes in request order.

        Each request gets exactly one outcome: its result or its `RequestFailed`. An exception of
        any other kind is a client bug and is re-raised after every worker has stopped.
        """
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self._client()  # refuses a closed client before any worker starts
        outcomes: list[GenerateResult | RequestFailed | None] = [None] * len(requests)
        pending: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(requests)):
            pending.put(index)
        bugs: list[BaseException] = []

        def work() -> None:
            try:
                with self._worker_client() as client:
                    while not bugs:
                        try:
                            index = pending.get_nowait()
                        except queue.Empty:
                            return
                        try:
                            outcomes[index] = self._generate_on(client, requests[index])
                        except RequestFailed as failure:
                            outcomes[index] = failure
            except BaseException as exc:  # re-raised in the caller's thread below
                bugs.append(exc)

        workers = [threading.Thread(target=work, daemon=True) for _ in range(min(concurrency, len(requests)))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if bugs:
            raise bugs[0]
        return cast("list[GenerateResult | RequestFailed]", outcomes)

    @contextlib.contextmanager
    def _worker_client(self) -> Iterator[Any]:
        """A client for one worker thread: HTTP opens (and closes, in that thread) its own."""
        if self.protocol == "grpc":
            yield self._client()
            return
        client = self._open()
        try:
            yield client
        finally:
            client.close()
            # The thread's gevent hub would otherwise outlive it, holding two file descriptors.
            gevent.get_hub().destroy(destroy_loop=True)

    def not_ready_reason(self) -> str | None:
        """None when the server and the model are ready, else why not (unreachable, not ready)."""
        client = self._client()
        timeout = self._grpc_timeout()
        try:
            with self._failures():
                if not client.is_server_ready(**timeout):
                    return f"server at {self.url} is not ready"
                if not client.is_model_ready(self.model, **timeout):
                    return f"model '{self.model}' at {self.url} is not ready"
        except RequestFailed as failure:
            if failure.status is None:  # transport failure: the message already names the URL
                return failure.message
            return f"cannot reach {self.protocol} server at {self.url}: {failure}"
        return None

    def is_ready(self) -> bool:
        return self.not_ready_reason() is None

    def inference_statistics(self, model_name: str | None = None) -> dict[str, Any]:
        """Statistics of `model_name` (default: this client's model), see `normalize_statistics`."""
        name = self.model if model_name is None else model_name
        client = self._client()
        with self._failures():
            if self.protocol == "grpc":
                raw = client.get_inference_statistics(name, as_json=True, **self._grpc_timeout())
            else:
                raw = client.get_inference_statistics(name)
        return normalize_statistics(raw, name)

    def model_signatures(self) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
        """Every loaded model's (input names, output names); models that cannot describe themselves (being
        loaded or unloaded) are left out."""
        client = self._client()
        timeout = self._grpc_timeout()
        with self._failures():
            if self.protocol == "grpc":
                stats = client.get_inference_statistics(as_json=True, **timeout)
            else:
                stats = client.get_inference_statistics()
        signatures = {}
        for name in sorted({model["name"] for model in stats.get("model_stats", [])}):
            try:
                with self._failures():
                    if self.protocol == "grpc":
                        metadata = client.get_model_metadata(name, as_json=True, **timeout)
                    else:
                        metadata = client.get_model_metadata(name)
            except RequestFailed:
                continue
            signatures[name] = (
                frozenset(tensor["name"] for tensor in metadata.get("inputs", [])),
                frozenset(tensor["name"] for tensor in metadata.get("outputs", [])),
            )
        return signatures

    def is_decoupled(self, model: str) -> bool:
        """Whether `model` is decoupled (it streams, and answers no plain infer): from its config."""
        client = self._client()
        with self._failures():
            if self.protocol == "grpc":
                config = client.get_model_config(model, as_json=True, **self._grpc_timeout()).get(
                    "config", {}
                )
            else:
                config = client.get_model_config(model)
        return bool(config.get("model_transaction_policy", {}).get("decoupled", False))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            opened, self._opened = self._opened, []
        for client in opened:
            client.close()
