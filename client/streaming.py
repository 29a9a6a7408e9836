"""Streaming from `generate_stream`: text deltas as they are generated, over gRPC streaming or HTTP SSE.

`stream_generate(url, protocol, request)` yields one `StreamChunk` per response; the last one has a
`finish_reason` (stop / length). Errors raise `RequestFailed` with the Triton-style code. Closing the
generator early (`break`, `.close()`) cancels the request on the server: gRPC stops the stream with
`cancel_requests=True`, SSE closes the connection; either way the server frees the request's row.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import queue
import re
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import tritonclient.grpc

from client.api import (
    OPTIONAL_INPUTS,
    GenerateRequest,
    RequestFailed,
    build_inputs,
    error_code,
    grpc_channel_args,
    output_count,
    output_text,
    request_failures,
    routing_headers,
)

STREAM_MODEL = "generate_stream"
_TAGGED = re.compile(r"\[([A-Z_]+)\] (.*)", re.DOTALL)
STREAM_OUTPUTS = ("text_output", "served_adapter_id", "adapter_version", "generated_tokens", "finish_reason")


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """One streamed response: the new text, tokens generated so far, why generation stopped ("" until the
    last chunk), the adapter that answers, and the seconds since the request was sent."""

    text: str
    generated_tokens: int
    finish_reason: str
    adapter_id: str
    adapter_version: str
    elapsed_s: float


def stream_generate(
    url: str,
    protocol: str,
    request: GenerateRequest,
    *,
    model: str = STREAM_MODEL,
    timeout_s: float | None = 120.0,
    stream: bool = True,
) -> Iterator[StreamChunk]:
    """The chunks of one streamed request; `url` is host:port of the chosen protocol. With `stream` false
    the server answers with one chunk, the whole answer."""
    if protocol == "grpc":
        return _grpc_stream(url, request, model, timeout_s, stream)
    if protocol == "http":
        return _sse_stream(url, request, model, timeout_s, stream)
    raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")


def _grpc_stream(
    url: str, request: GenerateRequest, model: str, timeout_s: float | None, stream: bool
) -> Iterator[StreamChunk]:
    answers: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
    client = tritonclient.grpc.InferenceServerClient(url, channel_args=grpc_channel_args())
    finished = False
    try:
        start = time.perf_counter()
        with request_failures(url, "grpc", timeout_s):
            client.start_stream(
                callback=lambda result, error: answers.put((result, error)),
                headers=routing_headers(request),
                **({"stream_timeout": timeout_s} if timeout_s else {}),
            )
            outputs = [tritonclient.grpc.InferRequestedOutput(name) for name in STREAM_OUTPUTS]
            inputs = build_inputs(request, tritonclient.grpc)
            if not stream:
                flag = tritonclient.grpc.InferInput("stream", [1, 1], "BOOL")
                flag.set_data_from_numpy(np.zeros((1, 1), dtype=np.bool_))
                inputs.append(flag)
            client.async_stream_infer(model, inputs, outputs=outputs)
        while not finished:
            try:
                result, error = answers.get(timeout=timeout_s)
            except queue.Empty:
                raise RequestFailed(
                    "DEADLINE_EXCEEDED", f"no streamed answer from {url} in {timeout_s} s"
                ) from None
            if error is not None:
                raise tagged_failure(error.message() or str(error), error.status())
            chunk = _chunk(result, time.perf_counter() - start)
            finished = bool(chunk.finish_reason)
            yield chunk
    finally:
        # Stopping before the final chunk cancels the request on the server (its row is freed).
        client.stop_stream(cancel_requests=not finished)
        client.close()


def _sse_stream(
    url: str, request: GenerateRequest, model: str, timeout_s: float | None, stream: bool
) -> Iterator[StreamChunk]:
    host, _, port = url.rpartition(":")
    body: dict[str, Any] = {
        "text_input": _text(request.text),
        "adapter_id": _text(request.adapter_id),
        "stream": stream,
    }
    if request.tenant_id is not None:
        body["tenant_id"] = _text(request.tenant_id)
    body.update(
        {name: getattr(request, name) for name, _ in OPTIONAL_INPUTS if getattr(request, name) is not None}
    )
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        start = time.perf_counter()
        with request_failures(url, "http", timeout_s):
            connection.request(
                "POST",
                f"/v2/models/{model}/generate_stream",
                body=json.dumps(body).encode("utf-8"),
                headers={
                    "Content-Type": "application/json",
                    "Accept": "text/event-stream",
                    **routing_headers(request),
                },
            )
            response = connection.getresponse()
        if response.status != 200:
            raise _http_failure(response.status, response.read())
        finished = False
        while not finished:
            with request_failures(url, "http", timeout_s):
                line = response.readline()
            if not line:
                raise RequestFailed("UNAVAILABLE", f"{url} closed the stream before its last chunk")
            if not line.startswith(b"data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                raise tagged_failure(str(event["error"]), None)
            chunk = StreamChunk(
                text=event["text_output"],
                generated_tokens=int(event["generated_tokens"]),
                finish_reason=event["finish_reason"],
                adapter_id=event["served_adapter_id"],
                adapter_version=event["adapter_version"],
                elapsed_s=time.perf_counter() - start,
            )
            finished = bool(chunk.finish_reason)
            yield chunk
    finally:
        connection.close()  # before the last chunk, this cancels the request on the server


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _http_failure(status: int, body: bytes) -> RequestFailed:
    text = body.decode("utf-8", "replace").strip()
    try:
        message = json.loads(text.removeprefix("data:")).get("error", text)
    except ValueError:
        message = text
    return tagged_failure(str(message), str(status))


def tagged_failure(message: str, status: str | None) -> RequestFailed:
    """A failure from a streamed error: `generate_stream` starts each message with its code, "[CODE] ..."
    (Triton 2.51 streams errors without one); otherwise the transport's status says what it can."""
    match = _TAGGED.fullmatch(message)
    if match:
        return RequestFailed(match.group(1), match.group(2), status)
    return RequestFailed(error_code(status), message, status)


def _chunk(result: Any, elapsed_s: float) -> StreamChunk:
    return StreamChunk(
        text=output_text(result, "text_output"),
        generated_tokens=output_count(result, "generated_tokens"),
        finish_reason=output_text(result, "finish_reason"),
        adapter_id=output_text(result, "served_adapter_id"),
        adapter_version=output_text(result, "adapter_version"),
        elapsed_s=elapsed_s,
    )
