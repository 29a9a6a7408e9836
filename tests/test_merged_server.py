"""Merged-weight variants through the real server, beside the adapter bank: same answers, same versions,
their own adapter_id contract; the merge tool's refusals; the compare command."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from client import AdapterClient, GenerateRequest, GenerateResult, RequestFailed
from client.compare import random_prompts, serving_process_rss
from tests.conftest import DEMO, DEMO_MERGED, ROOT
from training.tasks import get_task

TASKS = json.loads((DEMO / "tasks.json").read_text())["tasks"]


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return random_prompts(24, seed=11)


def _answers(server, protocol: str, model: str, adapter_id: str, prompts: list[str]):
    url = server.http_url if protocol == "http" else server.grpc_url
    with AdapterClient(url, protocol=protocol, model=model, timeout_s=120) as client:
        return client.generate_many([GenerateRequest(p, adapter_id) for p in prompts], concurrency=8)


@pytest.mark.parametrize("adapter_id", DEMO_MERGED)
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_merged_variant_answers_exactly_as_the_bank(demo_server, prompts, adapter_id, protocol):
    bank = _answers(demo_server, protocol, "generate", adapter_id, prompts)
    merged = _answers(demo_server, protocol, f"generate_merged_{adapter_id}", adapter_id, prompts)
    assert all(isinstance(o, GenerateResult) for o in bank + merged), [o for o in bank + merged]
    task = get_task(TASKS[adapter_id]["task"]).apply
    # The adapter really transforms these prompts (so agreement below is not agreement on the base's echo).
    assert sum(task(p) != p for p in prompts) >= len(prompts) // 2
    assert sum(b.text == task(p) for b, p in zip(bank, prompts, strict=True)) >= len(prompts) - 1
    assert [m.text for m in merged] == [b.text for b in bank]
    assert {m.adapter_id for m in merged} == {adapter_id}
    assert {m.adapter_version for m in merged} == {bank[0].adapter_version}
    assert bank[0].adapter_version.startswith("sha256:")


def test_merged_variant_serves_an_empty_adapter_id_as_its_own_adapter(demo_server, prompts):
    (bank,) = _answers(demo_server, "http", "generate", "upper", prompts[:1])
    (result,) = _answers(demo_server, "http", "generate_merged_upper", "", prompts[:1])
    assert isinstance(result, GenerateResult) and isinstance(bank, GenerateResult)
    assert result.text == get_task("upper").apply(prompts[0]) == bank.text
    assert result.adapter_version == bank.adapter_version
    # served_adapter_id names the adapter that answered, not the request's (empty) adapter_id: an ensemble
    # output named like an input would only echo that input.
    assert result.adapter_id == "upper"


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_another_adapter_id_on_a_merged_variant_is_invalid_arg_and_the_rest_is_served(
    demo_server, prompts, protocol
):
    ids = ["upper", "rot13", "", "../upper", "upper"]
    url = demo_server.http_url if protocol == "http" else demo_server.grpc_url
    with AdapterClient(url, protocol=protocol, model="generate_merged_upper", timeout_s=120) as client:
        outcomes = client.generate_many([GenerateRequest(prompts[0], a) for a in ids], concurrency=5)
    assert isinstance(outcomes[1], RequestFailed) and outcomes[1].code == "INVALID_ARG"
    assert "must be empty or 'upper'" in outcomes[1].message and "'rot13'" in outcomes[1].message
    assert isinstance(outcomes[3], RequestFailed) and outcomes[3].code == "INVALID_ARG"
    served = [outcomes[i] for i in (0, 2, 4)]
    assert all(isinstance(o, GenerateResult) for o in served), served
    assert {o.text for o in served} == {get_task("upper").apply(prompts[0])}
    assert len({o.adapter_version for o in served}) == 1


def test_each_path_has_its_own_serving_process(demo_server):
    bank = serving_process_rss("generate_stream", demo_server.pid)
    merged = serving_process_rss("merged_upper", demo_server.pid)
    assert bank is not None and merged is not None
    assert bank > 50 * 2**20 and merged > 50 * 2**20  # torch and a model are resident in each


def _merge_cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.merge", "--out", str(tmp_path), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        ("title", "bottleneck adapter and cannot be merged"),
        ("upper,shift", "'shift' is a bottleneck adapter"),
        ("nope", "adapter 'nope' is not in"),
        ("../models", "invalid adapter_id"),
    ],
)
def test_merge_tool_refuses_bottleneck_and_unknown_ids_before_writing(adapters, message, tmp_path):
    done = _merge_cli("--adapters", adapters, tmp_path=tmp_path)
    assert done.returncode == 2, done
    assert message in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written, not even the valid id's variant


def test_compare_command_reports_both_paths(demo_server, demo_merged_variants):
    weights = next(v.weights for v in demo_merged_variants if v.adapter_id == "rot13")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "client",
            "compare",
            "--url",
            demo_server.http_url,
            "--adapter",
            "rot13",
            "--prompts",
            "16",
            "--concurrency",
            "8",
            "--rounds",
            "1",
            "--merged-dir",
            str(weights),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "identical answers: 16 / 16" in done.stdout
    assert "| adapter bank | `generate` | 16 / 16 |" in done.stdout
    assert "| merged weights | `generate_merged_rot13` | 16 / 16 |" in done.stdout
    offline = re.search(r"greedy tokens agree (\d+) / (\d+), .* max \|logit difference\| (\S+)", done.stdout)
    assert offline, done.stdout
    agreeing, total, gap = int(offline[1]), int(offline[2]), float(offline[3])
    assert agreeing == total > 16 and gap < 1e-3


def test_serving_bench_measures_both_paths_on_a_live_server(demo_server):
    """The measurement behind `python -m bench.serving`, small, on the session's demo server."""
    from bench.serving import Scenario, measure, resident_memory, to_markdown

    prompts = random_prompts(12, seed=3, max_len=12)
    uniform = measure(demo_server.grpc_url, "demo", "uniform", DEMO_MERGED, prompts, rounds=2, max_tokens=12)
    assert (uniform.dynamic.answered, uniform.merged.answered) == (24, 24)
    assert uniform.dynamic.failed == uniform.merged.failed == 0
    assert uniform.agreeing == len(prompts)
    assert len(uniform.round_ratios) == 2 and uniform.throughput_ratio > 0
    memory = resident_memory(DEMO_MERGED, demo_server.pid)
    assert memory.bank is not None and set(memory.merged) == set(DEMO_MERGED) and memory.ratio > 0
    naive = measure(
        demo_server.grpc_url,
        "demo",
        "uniform",
        DEMO_MERGED,
        prompts,
        rounds=1,
        max_tokens=12,
        against="naive",
    )
    # The naive PEFT server answers every request, exactly as the bank does (greedy, fp32, the same weights).
    assert (naive.dynamic.answered, naive.merged.answered) == (12, 12) and naive.merged.failed == 0
    assert naive.agreeing == len(prompts) and naive.throughput_ratio > 0
    markdown = to_markdown([Scenario("demo", "demo", DEMO_MERGED, memory, [uniform, naive], 1.0)], {})
    assert "| demo | uniform | 3 |" in markdown and "| demo | 3 |" in markdown
    assert "naive PEFT req/s" in markdown and markdown.count("| demo | uniform | 3 |") == 2


def test_served_path_bench_measures_every_path_with_identical_answers(demo_server):
    """The measurement behind `python -m bench.served_path`, small, on the session's demo server: the four
    paths (in-process batched and threaded, served generate and generate_stream) answer identically."""
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine
    from multiadapter.tokenization import TextCodec

    from bench.served_path import PATHS, measure, to_markdown
    from tests.conftest import DEMO

    engine = Engine.load(EngineConfig(base_model=DEMO / "base", adapter_dir=DEMO / "adapters"))
    engine.start_loop()
    try:
        report = measure(demo_server.grpc_url, engine, TextCodec.load(DEMO / "base"), random_prompts(8, 5), 1)
    finally:
        engine.stop_loop()
    assert report.identical == {path: 8 for path in PATHS[1:]}
    assert all(len(report.ratios[path]) == 1 and report.ratios[path][0] > 0 for path in PATHS)
    assert "| served generate |" in to_markdown(report)
