"""The product end to end: real tritonserver, real model repository, tritonclient over HTTP and gRPC."""

from __future__ import annotations

import collections
import random
import subprocess
import sys
import time

import numpy as np
import pytest
from multiadapter.engine import GenerationRequest

from client import AdapterClient, GenerateRequest, GenerateResult, RequestFailed
from tests.conftest import ROOT

PROTOCOLS = ["http", "grpc"]
WORDS = ["hello", "adapter", "bank", "triton", "tenant", "mixed batch", "lora", "serving", "qué tal", "ok"]


@pytest.fixture(scope="module", params=PROTOCOLS)
def client(request, triton_server):
    url = triton_server.http_url if request.param == "http" else triton_server.grpc_url
    with AdapterClient(url, protocol=request.param, timeout_s=120) as c:
        assert c.is_ready()
        yield c


def expected(offline_engine, text: str, adapter_id: str, max_tokens: int | None = None) -> tuple[str, str]:
    """(text, adapter_version) that the offline engine gives for one greedy request."""
    engine, codec = offline_engine
    (result,) = engine.generate(
        [GenerationRequest(codec.encode(text.encode()), adapter_id, max_tokens=max_tokens)]
    )
    return codec.decode(result.output_ids), result.adapter_version


def burst(tiny_model, n: int, seed: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    ids = [*tiny_model.adapter_ids, ""]
    return [
        GenerateRequest(
            " ".join(rng.sample(WORDS, rng.randint(1, 3))), ids[i % len(ids)], max_tokens=rng.randint(4, 12)
        )
        for i in range(n)
    ]


def scrape(server, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` on Triton's /metrics whose labels include `labels`."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{server.metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_adapters_really_differ(client, tiny_model, offline_engine):
    answers = {a: expected(offline_engine, "hello world", a, 12)[0] for a in ["", *tiny_model.adapter_ids]}
    assert len(set(answers.values())) == len(answers), answers


def test_concurrent_mixed_burst_each_gets_its_adapters_answer_and_is_batched(
    client, tiny_model, offline_engine, triton_server
):
    requests = burst(tiny_model, 32, seed=len(client.protocol))
    before = client.inference_statistics("generate_stream")
    mixed_before = scrape(triton_server, "multiadapter_batches_total", composition="mixed")
    outcomes = client.generate_many(requests, concurrency=16)
    after = client.inference_statistics("generate_stream")
    mixed_after = scrape(triton_server, "multiadapter_batches_total", composition="mixed")
    for request, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, GenerateResult), outcome
        text, version = expected(offline_engine, request.text, request.adapter_id, request.max_tokens)
        assert outcome.text == text, request
        assert outcome.adapter_id == request.adapter_id
        assert outcome.adapter_version == version
        assert (version == "") == (request.adapter_id == "")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == len(requests)
    assert executions < inferences, (
        f"{executions} executions for {inferences} inferences: nothing was batched"
    )
    assert mixed_after > mixed_before, "no batch mixed adapters"


def _adapter_series(server, name: str, adapter: str, **labels: str) -> float:
    return scrape(server, name, model="generate_stream", adapter=adapter, **labels)


def test_per_adapter_metrics_count_exactly_what_was_sent(client, tiny_model, offline_engine, triton_server):
    """Each adapter's series on /metrics (requests by outcome, tokens, latency and first-token histograms)
    move by exactly what this burst sent; errors land under their code, unknown ids under "other"."""
    _, codec = offline_engine
    ids = ["", *tiny_model.adapter_ids]
    requests = [
        GenerateRequest(f"{WORDS[(i + k) % len(WORDS)]} metrics", adapter, max_tokens=3 + k)
        for i, adapter in enumerate(ids)
        for k in range(1 + i % 3)
    ]
    bad = [
        (GenerateRequest("hello", ids[1], temperature=-0.5), ids[1], "INVALID_ARG"),
        (GenerateRequest("hello", "", max_tokens=0), "", "INVALID_ARG"),
        (GenerateRequest("hello", "never-served-adapter"), "other", "NOT_FOUND"),
    ]
    names = {
        "ok": "multiadapter_adapter_requests_total",
        "prompt": "multiadapter_adapter_prompt_tokens_total",
        "generated": "multiadapter_adapter_generated_tokens_total",
        "latency": "multiadapter_adapter_request_duration_seconds_count",
        "ttft": "multiadapter_adapter_time_to_first_token_seconds_count",
    }

    def snapshot() -> dict[tuple[str, str], float]:
        values = {}
        for adapter in [*ids, "other"]:
            for key, name in names.items():
                labels = {"outcome": "ok"} if key == "ok" else {}
                values[adapter, key] = _adapter_series(triton_server, name, adapter, **labels)
            for code in ("INVALID_ARG", "NOT_FOUND"):
                values[adapter, code] = _adapter_series(triton_server, names["ok"], adapter, outcome=code)
        return values

    before = snapshot()
    outcomes = client.generate_many(requests, concurrency=8)
    for request, _, code in bad:
        with pytest.raises(RequestFailed) as info:
            client.generate(request)
        assert info.value.code == code
    want = collections.Counter()
    for request, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, GenerateResult), outcome
        a = request.adapter_id
        want[a, "ok"] += 1
        want[a, "latency"] += 1
        want[a, "ttft"] += 1
        want[a, "prompt"] += len(codec.encode(request.text.encode()))
        want[a, "generated"] += outcome.generated_tokens
        assert outcome.generated_tokens > 0
    for _, label, code in bad:
        want[label, code] += 1
        want[label, "latency"] += 1
    assert len({a for a, _ in want}) == len(ids) + 1  # every adapter, the base and "other" have traffic

    deadline = time.monotonic() + 15  # the exporter sends every 0.25 s
    while True:
        after = snapshot()
        moved = {key: after[key] - before[key] for key in after}
        if all(moved[key] == want.get(key, 0) for key in moved) or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    assert {k: v for k, v in moved.items() if v} == {k: v for k, v in want.items() if v}
    # The adapter cache's state: every served adapter resident, within the device budget.
    device = scrape(triton_server, "multiadapter_cache_adapters", model="generate_stream", tier="device")
    used, budget = (
        scrape(triton_server, "multiadapter_cache_bytes", model="generate_stream", tier="device", kind=kind)
        for kind in ("used", "budget")
    )
    assert device >= len(tiny_model.adapter_ids) and 0 < used <= budget


def test_one_bad_request_in_a_burst_fails_alone(client, tiny_model, offline_engine):
    requests = burst(tiny_model, 15, seed=7)
    requests.insert(6, GenerateRequest("hello", "no-such-adapter", max_tokens=4))
    requests.insert(11, GenerateRequest("hello", "", max_tokens=0))
    outcomes = client.generate_many(requests, concurrency=16)
    for i, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        if i == 6:
            assert isinstance(outcome, RequestFailed) and outcome.code == "NOT_FOUND"
            assert "no-such-adapter" in outcome.message
        elif i == 11:
            assert isinstance(outcome, RequestFailed) and outcome.code == "INVALID_ARG"
        else:
            assert isinstance(outcome, GenerateResult), outcome
            assert (
                outcome.text
                == expected(offline_engine, request.text, request.adapter_id, request.max_tokens)[0]
            )


ERRORS = [
    (dict(text="hi", adapter_id="nope"), "NOT_FOUND", "adapter 'nope' does not exist on this server"),
    (dict(text="hi", adapter_id="broken"), "NOT_FOUND", "adapter 'broken' is not servable: use_dora"),
    (dict(text="hi", adapter_id="../alpha"), "INVALID_ARG", "invalid adapter_id"),
    (dict(text="hi", adapter_id="/etc/passwd"), "INVALID_ARG", "invalid adapter_id"),
    (dict(text="hi", adapter_id="a\x00b"), "INVALID_ARG", "invalid adapter_id"),
    (dict(text="hi", adapter_id="x" * 10_000), "INVALID_ARG", "invalid adapter_id"),
    (dict(text=b"\xff\xfe broken", adapter_id=""), "INVALID_ARG", "not valid UTF-8"),
    (dict(text="", adapter_id=""), "INVALID_ARG", "text_input is empty"),
    (dict(text="x" * 400, adapter_id=""), "INVALID_ARG", "context window is 256 tokens"),
    (dict(text="x" * (1 << 20), adapter_id=""), "INVALID_ARG", "the limit is"),
    (dict(text="hi", adapter_id="", max_tokens=0), "INVALID_ARG", "max_tokens must be between 1 and"),
    (dict(text="hi", adapter_id="", max_tokens=100_000), "INVALID_ARG", "max_tokens must be between 1 and"),
    (dict(text="hi", adapter_id="", temperature=-0.5), "INVALID_ARG", "temperature must be"),
    (dict(text="hi", adapter_id="", top_p=0.0), "INVALID_ARG", "top_p must be in (0, 1]"),
    (dict(text="hi", adapter_id="", top_p=1.5), "INVALID_ARG", "top_p must be in (0, 1]"),
    (dict(text="hi", adapter_id="", top_k=-3), "INVALID_ARG", "top_k must be >= 0"),
]


@pytest.mark.parametrize(("fields", "code", "message"), ERRORS, ids=[e[2][:24] for e in ERRORS])
def test_bad_request_gets_a_typed_error_and_the_server_stays_ready(
    client, triton_server, fields, code, message
):
    lm_errors = scrape(triton_server, "multiadapter_request_errors_total", code=code)
    with pytest.raises(RequestFailed) as info:
        client.generate(GenerateRequest(**fields))
    assert info.value.code == code
    assert message in info.value.message
    assert client.is_ready()
    if "text_input" not in message and "UTF-8" not in message and "the limit is" not in message:
        # errors found by the LM step are counted there (the tokenizer step rejects the others)
        assert scrape(triton_server, "multiadapter_request_errors_total", code=code) == lm_errors + 1


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(client):
    sampled = [
        client.generate(GenerateRequest("hello", "alpha", max_tokens=12, temperature=1.5, seed=s)).text
        for s in (11, 11, 12, 13, 14)
    ]
    assert sampled[0] == sampled[1]
    assert len(set(sampled[1:])) > 1


def test_missing_and_malformed_inputs_are_rejected(triton_server):
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    with http.InferenceServerClient(triton_server.http_url) as raw:
        text = http.InferInput("text_input", [1, 1], "BYTES")
        text.set_data_from_numpy(np.array([[b"hi"]], dtype=object))
        with pytest.raises(InferenceServerException) as info:
            raw.infer("generate", [text])
        assert info.value.status() == "400" and "adapter_id" in info.value.message()
        adapter = http.InferInput("adapter_id", [1, 1], "BYTES")
        adapter.set_data_from_numpy(np.array([[b""]], dtype=object))
        wrong = http.InferInput("max_tokens", [1, 1], "FP32")
        wrong.set_data_from_numpy(np.array([[3.0]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as info:
            raw.infer("generate", [text, adapter, wrong])
        assert info.value.status() == "400"
        assert raw.is_server_ready()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "client", *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_cli_prints_the_adapters_answer(triton_server, offline_engine, protocol):
    url = triton_server.http_url if protocol == "http" else triton_server.grpc_url
    flags = ["--grpc"] if protocol == "grpc" else []
    done = _cli("generate", *flags, "--url", url, "--adapter", "beta", "--max-tokens", "8", "hello there")
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == expected(offline_engine, "hello there", "beta", 8)[0]


def test_cli_burst_over_several_adapters_reports_failures(triton_server):
    url = triton_server.http_url
    ok = _cli(
        "generate",
        "--url",
        url,
        "--adapter",
        "alpha",
        "--adapter",
        "",
        "--adapter",
        "gamma",
        "--concurrency",
        "4",
        "--repeat",
        "9",
        "--max-tokens",
        "4",
        "hi",
    )
    assert ok.returncode == 0, ok.stderr
    bad = _cli(
        "generate",
        "--url",
        url,
        "--adapter",
        "alpha",
        "--adapter",
        "missing",
        "--concurrency",
        "2",
        "--repeat",
        "4",
        "--max-tokens",
        "4",
        "hi",
    )
    assert bad.returncode == 1
    assert "NOT_FOUND" in bad.stdout + bad.stderr
