"""Streaming and cancellation through the real server: `generate_stream` over gRPC streaming and HTTP SSE,
and `generate` answered by the same engine.

- Streamed deltas joined equal `generate`'s text exactly, for every adapter and the base, including prompts
  and answers whose characters a byte-level tokenizer splits over several tokens.
- A short request sent while long ones are generated finishes first, and every answer is what the same
  request gets alone.
- A cancelled stream (gRPC `stop_stream(cancel_requests=True)`, a closed SSE connection) frees its row: the
  engine's own gauge of requests in flight returns to zero, the CANCELLED count grows, and later requests
  are exact. So does a gRPC deadline that passes, on a stream and on `generate`.
"""

from __future__ import annotations

import threading
import time

import pytest

from client import AdapterClient, GenerateRequest, GenerateResult, RequestFailed
from client.streaming import StreamChunk, stream_generate
from tests.conftest import DEMO_TASKS
from tests.test_reliability import demo_probes
from tests.test_server import scrape

PROTOCOLS = ["grpc", "http"]
# Multi-byte characters: with one token per byte, each of these is split over 2 to 4 tokens.
PROMPTS = ["hello world", "héllo wörld", "naïve café €5", "日本語 ok", "emoji 🙂 too"]
ENGINE = "generate_stream"


def url_of(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


def streamed(server, protocol: str, request: GenerateRequest) -> list[StreamChunk]:
    return list(stream_generate(url_of(server, protocol), protocol, request))


def check_chunks(chunks: list[StreamChunk]) -> str:
    """The joined text, after checking the stream's shape: only the last chunk says why it stopped."""
    assert chunks, "no chunk"
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason in ("stop", "length")
    counts = [c.generated_tokens for c in chunks]
    assert counts == sorted(counts) and counts[0] >= 1
    return "".join(c.text for c in chunks)


def in_flight(server) -> float:
    """Requests the engine holds (waiting or running), and requests Triton holds for `generate`."""
    return scrape(server, "multiadapter_engine_requests", model=ENGINE) + scrape(
        server, "nv_inference_pending_request_count", model="generate"
    )


def wait_idle(server, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while in_flight(server) != 0:
        assert time.monotonic() < deadline, f"still in flight after {timeout_s} s: {in_flight(server)}"
        time.sleep(0.1)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_streamed_text_joins_to_generate_for_every_adapter_even_split_characters(
    triton_server, tiny_model, protocol
):
    """The tiny model's random weights answer with arbitrary bytes: characters split over tokens, and
    incomplete sequences that must be held back until they complete (or end as U+FFFD at the end)."""
    adapters = ["", *tiny_model.adapter_ids]
    split_characters = 0
    with AdapterClient(url_of(triton_server, protocol), protocol=protocol, timeout_s=120) as client:
        for adapter in adapters:
            for prompt in PROMPTS:
                request = GenerateRequest(prompt, adapter, max_tokens=24)
                chunks = streamed(triton_server, protocol, request)
                answer = client.generate(request)
                assert check_chunks(chunks) == answer.text, (adapter, prompt)
                assert chunks[-1].generated_tokens == answer.generated_tokens
                assert {(c.adapter_id, c.adapter_version) for c in chunks} == {
                    (answer.adapter_id, answer.adapter_version)
                }
                split_characters += sum(len(c.encode()) > 1 and c != "\ufffd" for c in answer.text)
                assert len(chunks) > 1 or answer.generated_tokens <= 1  # streamed as generated
    assert split_characters > 0, "no answer had a multi-byte character: the hold-back was not exercised"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_every_demo_adapter_streams_its_exact_answer(demo_server, protocol):
    probes = demo_probes(2 * len(DEMO_TASKS), seed=11)
    assert {p.request.adapter_id for p in probes} == set(DEMO_TASKS)
    for probe in probes:
        assert check_chunks(streamed(demo_server, protocol, probe.request)) == probe.expected, probe


def test_a_short_request_finishes_first_while_long_ones_run(demo_server):
    """Continuous batching: the short request joins the running batch and leaves it at once."""
    # The demo's context window is 64 tokens: 30 for the prompt, up to 34 for the answer.
    long_requests = [
        GenerateRequest("the quick brown fox jumps ov", adapter, max_tokens=34)
        for adapter in ("", "reverse", "rot13", "title")
    ]
    short = next(p for p in demo_probes(14, seed=5) if p.request.adapter_id == "upper")
    with AdapterClient(demo_server.grpc_url, protocol="grpc", timeout_s=120) as client:
        alone = [client.generate(r).text for r in long_requests]
    finished: dict[str, float] = {}
    texts: dict[str, str] = {}
    started = threading.Barrier(len(long_requests) + 1)

    def run(name: str, request: GenerateRequest) -> None:
        chunks = stream_generate(demo_server.grpc_url, "grpc", request)
        first = next(chunks)
        started.wait(timeout=60)  # every long request is generating
        rest = list(chunks)
        texts[name] = check_chunks([first, *rest])
        finished[name] = time.monotonic()

    threads = [threading.Thread(target=run, args=(f"long{i}", r)) for i, r in enumerate(long_requests)]
    for thread in threads:
        thread.start()
    started.wait(timeout=60)
    sent = time.monotonic()
    answer = AdapterClient(demo_server.http_url, timeout_s=120).generate(short.request)
    finished["short"] = time.monotonic()
    for thread in threads:
        thread.join(120)
    assert answer.text == short.expected
    assert [texts[f"long{i}"] for i in range(len(long_requests))] == alone  # as if each ran alone
    assert all(finished["short"] < finished[f"long{i}"] for i in range(len(long_requests))), finished
    print(f"short request answered in {finished['short'] - sent:.2f} s while 4 long ones ran")


# The tiny model's random weights seldom emit EOS: this request runs its 240 tokens unless cancelled (about
# 0.5 s alone on 2 cores; under 15 other such rows, about 3 s: ample time to see a cancellation).
LONG = GenerateRequest("go", "", max_tokens=240)


def cancelled_count(server) -> float:
    return scrape(server, "multiadapter_request_errors_total", model=ENGINE, code="CANCELLED")


def busy(server, rows: int) -> tuple[list[threading.Thread], list[StreamChunk]]:
    """`rows` long streams that run to their end, started now (the caller joins them), and where each one's
    last chunk goes."""
    last_chunks: list[StreamChunk] = []

    def run() -> None:
        last_chunks.append(list(stream_generate(server.grpc_url, "grpc", LONG))[-1])

    threads = [threading.Thread(target=run) for _ in range(rows)]
    for thread in threads:
        thread.start()
    return threads, last_chunks


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cancelling_mid_stream_frees_the_row_and_the_server_stays_exact(
    triton_server, offline_engine, protocol
):
    from tests.test_server import expected

    wait_idle(triton_server)
    cancelled_before = cancelled_count(triton_server)
    others, their_ends = busy(triton_server, 15)
    chunks = stream_generate(url_of(triton_server, protocol), protocol, LONG)
    got = [next(chunks), next(chunks)]
    assert not got[-1].finish_reason  # still generating
    chunks.close()  # gRPC: stop_stream(cancel_requests=True); SSE: the connection closes
    for thread in others:
        thread.join(120)
    # The rows around it ran to their end, untouched.
    assert [c.finish_reason for c in their_ends] == ["length"] * 15
    wait_idle(triton_server)
    assert cancelled_count(triton_server) == cancelled_before + 1, "the engine did not cancel the request"
    request = GenerateRequest("after a cancel", "", max_tokens=12)
    answer = expected(offline_engine, request.text, "", 12)[0]
    assert check_chunks(streamed(triton_server, protocol, request)) == answer


# Past this, a LONG request among 15 other long rows (about 3 s on 2 cores) is still running: its deadline
# passes while its row is in the engine, not while it waits in Triton's queue.
DEADLINE_S = 1.5


@pytest.mark.parametrize("model", [ENGINE, "generate"])
def test_a_grpc_deadline_cancels_the_request_in_the_engine(triton_server, offline_engine, model):
    """A gRPC client whose deadline passes gets DEADLINE_EXCEEDED, and the engine frees the row: for a
    stream on `generate_stream`, and for a plain infer on `generate` (its front cancels the engine's sequence
    by key when Triton says the request was cancelled)."""
    from tests.test_server import expected

    wait_idle(triton_server)
    cancelled_before = cancelled_count(triton_server)
    others, their_ends = busy(triton_server, 15)
    sent = time.monotonic()
    with pytest.raises(RequestFailed) as failure:
        if model == ENGINE:
            list(stream_generate(triton_server.grpc_url, "grpc", LONG, timeout_s=DEADLINE_S))
        else:
            with AdapterClient(triton_server.grpc_url, protocol="grpc", timeout_s=DEADLINE_S) as client:
                client.generate(LONG)
    waited = time.monotonic() - sent
    assert failure.value.code == "DEADLINE_EXCEEDED", failure.value
    assert waited < DEADLINE_S + 1.0, f"the client waited {waited:.1f} s past a {DEADLINE_S} s deadline"
    for thread in others:
        thread.join(120)
    assert [c.finish_reason for c in their_ends] == ["length"] * 15
    wait_idle(triton_server)
    assert cancelled_count(triton_server) == cancelled_before + 1, "the engine did not cancel the request"
    request = GenerateRequest("after a deadline", "", max_tokens=12)
    with AdapterClient(triton_server.grpc_url, protocol="grpc", timeout_s=60) as client:
        assert client.generate(request).text == expected(offline_engine, request.text, "", 12)[0]


def test_a_burst_of_cancellations_leaves_nothing_in_flight(triton_server, offline_engine):
    """Streams cancelled at once or after a few tokens, over both protocols: every one is cancelled in the
    engine, and nothing is left in flight."""
    from tests.test_server import expected

    server = triton_server
    wait_idle(server)
    cancelled_before = cancelled_count(server)
    long = LONG
    errors: list[BaseException] = []

    def stream_then_cancel(protocol: str, after: int) -> None:
        try:
            chunks = stream_generate(url_of(server, protocol), protocol, long)
            for _ in range(after):
                next(chunks)
            chunks.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=stream_then_cancel, args=(protocol, after))
        for protocol in PROTOCOLS
        for after in (1, 1, 3, 5)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    wait_idle(server, timeout_s=30)
    # The engine's gauge falls to zero when the loop retires the rows; the responder thread sends their
    # CANCELLED answers (and counts them) just after: wait for the count, then check it is exact.
    deadline = time.monotonic() + 10
    while cancelled_count(server) - cancelled_before < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    cancelled = cancelled_count(server) - cancelled_before
    assert cancelled == 8, f"{cancelled} of the 8 cancelled streams were cancelled in the engine"
    assert scrape(server, "nv_inference_pending_request_count") == 0
    with AdapterClient(server.http_url, timeout_s=60) as client:
        for text in ("after", "the burst"):
            result = client.generate(GenerateRequest(text, "", max_tokens=12))
            assert isinstance(result, GenerateResult)
            assert result.text == expected(offline_engine, text, "", 12)[0]
