"""The demo model through the real server: each request answered by the adapter it asked for, exactly."""

from __future__ import annotations

import random
import string

import pytest
from multiadapter.engine import GenerationRequest

from client import AdapterClient, GenerateRequest, GenerateResult
from tests.conftest import DEMO, DEMO_TASKS
from tests.test_server import scrape
from training.tasks import get_task

TASKS = DEMO_TASKS


@pytest.fixture(scope="module")
def burst_requests():
    """64 random prompts spread over every demo adapter (LoRA and bottleneck) and the base, keeping only
    prompts the offline model answers exactly (the >= 99% offline figure allows rare misses)."""
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine
    from multiadapter.tokenization import TextCodec

    engine = Engine.load(
        EngineConfig(base_model=DEMO / "base", adapter_dir=DEMO / "adapters", queue_timeout_ms=0)
    )
    codec = TextCodec.load(DEMO / "base")
    rng = random.Random(2026)
    ids = list(TASKS)
    alphabet = string.ascii_lowercase + " "
    candidates = [
        ("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24))), ids[i % len(ids)])
        for i in range(96)
    ]
    candidates = [(p, a) for p, a in candidates if p.strip()]
    outcomes = engine.generate([GenerationRequest(codec.encode(p.encode()), a) for p, a in candidates])
    kept = [
        GenerateRequest(p, a)
        for (p, a), out in zip(candidates, outcomes, strict=True)
        if codec.decode(out.output_ids) == get_task(TASKS[a]).apply(p)
    ]
    assert len(kept) >= 64, f"only {len(kept)} of {len(candidates)} prompts answered right offline"
    return kept[:64]


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_mixed_burst_every_answer_is_its_adapters_task(demo_server, burst_requests, protocol):
    url = demo_server.http_url if protocol == "http" else demo_server.grpc_url
    with AdapterClient(url, protocol=protocol, timeout_s=120) as client:
        before = client.inference_statistics("generate_stream")
        mixed_before = scrape(demo_server, "multiadapter_batches_total", composition="mixed")
        outcomes = client.generate_many(burst_requests, concurrency=16)
        after = client.inference_statistics("generate_stream")
    for request, outcome in zip(burst_requests, outcomes, strict=True):
        assert isinstance(outcome, GenerateResult), outcome
        assert outcome.text == get_task(TASKS[request.adapter_id]).apply(request.text), request
        assert outcome.adapter_id == request.adapter_id
    assert (
        after["execution_count"] - before["execution_count"]
        < after["inference_count"] - before["inference_count"]
    )
    assert scrape(demo_server, "multiadapter_batches_total", composition="mixed") > mixed_before
