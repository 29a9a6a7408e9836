"""Fast tests of the load test's pure parts: traffic draws and the oracle, the ledger, the summary, the CLI.

No server and no Locust process: the demo's own tasks and accuracy files, seeded generators, fake clocks.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from loadtest.__main__ import build_parser
from loadtest.bench import BenchPoint, bench_markdown, plot
from loadtest.ledger import Anomaly, Ledger, LedgerSnapshot, Tally, merge, reconcile
from loadtest.memory import MIB, MemorySample, fit_growth
from loadtest.options import traffic_argv, traffic_config
from loadtest.report import (
    FailureExample,
    Latency,
    Summary,
    build_summary,
    format_table,
    stat_key,
    verdict,
)
from loadtest.runner import LOCUSTFILE, LoadSettings, locust_command, new_report_dir, parse_duration
from loadtest.traffic import (
    DEMO_ACCURACY_FILE,
    DEMO_TASKS_FILE,
    NOT_REPRODUCIBLE,
    OK,
    WRONG_ANSWER,
    Answer,
    DemoContract,
    Expectation,
    MaxTokensMix,
    PlannedRequest,
    Popularity,
    ReproducibilityMemo,
    Sampling,
    TrafficConfig,
    TrafficPlan,
    check,
    expected_answer,
    request_name,
)
from tests.conftest import DEMO_TASKS
from training.tasks import get_task

CONTRACT = DemoContract.load(DEMO_TASKS_FILE, DEMO_ACCURACY_FILE)
ADAPTERS = tuple(a for a in DEMO_TASKS if a)


def plan(**fields) -> TrafficPlan:
    return TrafficPlan(TrafficConfig(**fields), CONTRACT)


def draws(traffic: TrafficPlan, n: int, seed: int = 0) -> list[PlannedRequest]:
    rng = np.random.default_rng(seed)
    return [traffic.draw(rng) for _ in range(n)]


# --- traffic shape -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "n", "weights"),
    [
        ("uniform", 4, [0.25, 0.25, 0.25, 0.25]),
        ("zipf:1", 3, [6 / 11, 3 / 11, 2 / 11]),
        ("zipf:0", 2, [0.5, 0.5]),
        ("zipf:2", 2, [0.8, 0.2]),
        ("hot:1:0.7", 3, [0.7, 0.15, 0.15]),
        ("hot:2:0.5", 4, [0.25, 0.25, 0.25, 0.25]),
        ("hot:2:1", 3, [0.5, 0.5, 0.0]),
        ("hot:3:0.9", 3, [1 / 3, 1 / 3, 1 / 3]),  # a hot set as large as the list is the whole list
        ("uniform", 1, [1.0]),
    ],
)
def test_popularity_weights(text: str, n: int, weights: list[float]) -> None:
    popularity = Popularity.parse(text)
    assert popularity.weights(n) == pytest.approx(weights)
    assert Popularity.parse(str(popularity)) == popularity


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("zipf", "expected uniform, zipf:S or hot:K:SHARE"),
        ("zipf:x", "expected uniform"),
        ("zipf:-1", "zipf exponent must be finite and >= 0"),
        ("hot:0:0.5", "hot set size must be >= 1"),
        ("hot:1:1.5", "hot share must be in [0, 1]"),
        ("uniform:1", "expected uniform"),
        ("pareto:1", "expected uniform"),
    ],
)
def test_popularity_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Popularity.parse(text)


@pytest.mark.parametrize(
    ("fields", "problems"),
    [
        ({"base_share": 1.5}, ["base share must be in [0, 1]"]),
        ({"adapters": ("upper", "")}, ["adapters must be distinct, non-empty ids"]),
        ({"adapters": ("upper", "upper")}, ["adapters must be distinct"]),
        ({"prompt_lengths": (5, 3)}, ["prompt lengths must be 1 <= MIN <= MAX"]),
        ({"default_max_tokens": 0}, ["default max_tokens must be >= 1"]),
        ({"miss_dtype": "float16"}, ["miss dtype must be one of"]),
        ({"task_overrides": (("upper", "shout"),)}, ["unknown task 'shout'"]),
        (
            {"sampling": Sampling(share=2, temperature=0, top_p=0, top_k=-1, seeds=0, prompts=0)},
            ["sampled share", "temperature", "top_p", "top_k", "seeds", "sampled prompts"],
        ),
        ({"max_tokens": MaxTokensMix(0, 0, 0)}, ["weights must be finite, >= 0 and not all 0"]),
    ],
)
def test_traffic_config_lists_every_problem(fields: dict, problems: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        TrafficConfig(**fields)
    for problem in problems:
        assert problem in str(excinfo.value)


def test_plan_refuses_an_adapter_the_tasks_file_does_not_know() -> None:
    with pytest.raises(ValueError, match="adapters not in the tasks file: nope"):
        plan(adapters=("upper", "nope"))
    with pytest.raises(ValueError, match=r"nope \(override\)"):
        plan(task_overrides=(("nope", "echo"),))


def shares(requests: list[PlannedRequest]) -> dict[str, float]:
    counts = Counter(r.adapter_id for r in requests)
    return {adapter: count / len(requests) for adapter, count in counts.items()}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {a: 1 / 7 for a in DEMO_TASKS}),  # the base as often as one adapter
        ({"base_share": 0.5}, {"": 0.5, **{a: 0.5 / 6 for a in ADAPTERS}}),
        ({"base_share": 0.0}, {a: 1 / 6 for a in ADAPTERS}),
        ({"base_share": 1.0}, {"": 1.0}),
        (
            {"base_share": 0.0, "popularity": Popularity("zipf", zipf_s=1.0)},
            dict(zip(ADAPTERS, Popularity("zipf").weights(6), strict=True)),
        ),
        (
            {
                "adapters": ("title", "upper"),
                "base_share": 0.2,
                "popularity": Popularity("hot", hot_count=1, hot_share=0.9),
            },
            {"": 0.2, "title": 0.72, "upper": 0.08},
        ),
    ],
)
def test_adapter_shares_follow_popularity_and_base_share(fields: dict, expected: dict[str, float]) -> None:
    drawn = shares(draws(plan(**fields), 4000))
    assert set(drawn) == {a for a, share in expected.items() if share > 0}
    for adapter, share in expected.items():
        assert drawn.get(adapter, 0.0) == pytest.approx(share, abs=0.03), adapter


def test_prompt_pool_is_the_evaluation_set_minus_each_adapters_misses() -> None:
    traffic = plan()
    assert any(CONTRACT.misses.values()), (
        "the accuracy file lists no fp32 miss: this test would check nothing"
    )
    for adapter in DEMO_TASKS:
        misses = CONTRACT.misses.get(adapter, frozenset())
        pool = traffic.pools[adapter].prompts()
        assert len(pool) == 1000 - len(misses)
        assert not misses & set(pool)
    assert not any(r.prompt in CONTRACT.misses[r.adapter_id] for r in draws(traffic, 3000))


def test_the_bfloat16_misses_can_be_left_out_instead() -> None:
    contract = DemoContract.load(DEMO_TASKS_FILE, DEMO_ACCURACY_FILE, "bfloat16")
    assert contract.misses != CONTRACT.misses
    traffic = TrafficPlan(TrafficConfig(miss_dtype="bfloat16"), contract)
    assert not contract.misses["reverse"] & set(traffic.pools["reverse"].prompts())


def test_prompt_lengths_are_drawn_uniformly_within_the_range() -> None:
    requests = draws(plan(prompt_lengths=(3, 5)), 3000)
    lengths = Counter(len(r.prompt) for r in requests)
    assert set(lengths) == {3, 4, 5}
    for count in lengths.values():
        assert count / len(requests) == pytest.approx(1 / 3, abs=0.04)


def test_default_prompt_lengths_come_from_the_tasks_file() -> None:
    lengths = {len(r.prompt) for r in draws(plan(), 3000)}
    assert min(lengths) == CONTRACT.prompt_lengths[0] == 1
    assert max(lengths) == CONTRACT.prompt_lengths[1] == 24


@pytest.mark.parametrize(
    ("answer", "max_tokens", "default", "text", "tokens"),
    [
        ("HELLO", None, 64, "HELLO", 6),  # server default: the whole answer, then EOS
        ("HELLO", 6, 64, "HELLO", 6),
        ("HELLO", 40, 64, "HELLO", 6),
        ("HELLO", 5, 64, "HELLO", 5),  # exactly the answer's length: stopped by max_tokens, no EOS
        ("HELLO", 3, 64, "HEL", 3),
        ("HELLO", 1, 64, "H", 1),
        ("HELLO", None, 4, "HELL", 4),  # a server default below the answer's length truncates too
    ],
)
def test_expected_answer_under_max_tokens(
    answer: str, max_tokens: int | None, default: int, text: str, tokens: int
) -> None:
    assert expected_answer(answer, max_tokens, default) == Expectation(text, tokens)


@pytest.mark.parametrize(
    ("mix", "rule"),
    [
        (MaxTokensMix(1, 0, 0), lambda k, n: k is None),
        (MaxTokensMix(0, 1, 0), lambda k, n: 1 <= k <= n),
        (MaxTokensMix(0, 0, 1), lambda k, n: n < k <= n + 16),
    ],
    ids=["omit", "truncate", "ample"],
)
def test_max_tokens_draws_and_expected_answers(mix: MaxTokensMix, rule) -> None:
    for request in draws(plan(max_tokens=mix), 500):
        answer = get_task(DEMO_TASKS[request.adapter_id]).apply(request.prompt)
        assert rule(request.max_tokens, len(answer)), request
        assert request.expected == expected_answer(answer, request.max_tokens, 64)


def test_max_tokens_mix_shares() -> None:
    kinds = Counter(
        "omit" if r.max_tokens is None else "truncate" if r.max_tokens <= len(r.prompt) else "ample"
        for r in draws(plan(max_tokens=MaxTokensMix(2, 1, 1)), 4000)
    )
    assert kinds["omit"] / 4000 == pytest.approx(0.5, abs=0.03)
    assert kinds["truncate"] / 4000 == pytest.approx(0.25, abs=0.03)


def test_task_override_changes_the_oracle_for_that_adapter_only() -> None:
    traffic = plan(task_overrides=(("upper", "reverse"),))
    assert traffic.answer("upper", "abc d") == "d cba"
    assert traffic.answer("rot13", "abc d") == "nop q"


def test_sampled_requests_recur_with_few_seeds_and_prompts() -> None:
    sampling = Sampling(share=1.0, temperature=0.7, top_p=0.9, top_k=5, seeds=3, prompts=4)
    traffic = plan(sampling=sampling, adapters=("upper",), base_share=0.0)
    requests = draws(traffic, 400)
    assert all(r.sampled and r.expected is None for r in requests)
    assert {r.seed for r in requests} == {0, 1, 2}
    assert {(r.temperature, r.top_p, r.top_k) for r in requests} == {(0.7, 0.9, 5)}
    recurring = set(traffic.sampled_pools["upper"].prompts())
    assert len(recurring) == 4 and recurring <= set(traffic.pools["upper"].prompts())
    assert {r.prompt for r in requests} == recurring
    assert len({r.reproducibility_key() for r in requests}) < len(requests)  # they do recur


def test_default_traffic_is_greedy_only() -> None:
    assert not any(r.sampled or r.expected is None for r in draws(plan(), 500))


def test_draws_are_reproducible_per_seed() -> None:
    assert draws(plan(), 50, seed=7) == draws(plan(), 50, seed=7)
    assert draws(plan(), 50, seed=7) != draws(plan(), 50, seed=8)


GREEDY = PlannedRequest("upper", "hello", 3, expected=Expectation("HEL", 3))
SAMPLED = PlannedRequest("upper", "hello", 4, temperature=0.8, top_p=0.9, top_k=0, seed=1)


@pytest.mark.parametrize(
    ("planned", "answers", "kinds"),
    [
        (GREEDY, [Answer("HEL", "upper", 3)], [OK]),
        (GREEDY, [Answer("HELL", "upper", 4)], [WRONG_ANSWER]),
        (GREEDY, [Answer("hel", "upper", 3)], [WRONG_ANSWER]),
        (GREEDY, [Answer("HEL", "reverse", 3)], [WRONG_ANSWER]),  # answered by another adapter
        (GREEDY, [Answer("HEL", "upper", 4)], [WRONG_ANSWER]),  # generated_tokens disagrees
        (SAMPLED, [Answer("xq", "upper", 3), Answer("xq", "upper", 3)], [OK, OK]),
        (SAMPLED, [Answer("xq", "upper", 3), Answer("xz", "upper", 3)], [OK, NOT_REPRODUCIBLE]),
        (SAMPLED, [Answer("xq", "upper", 3), Answer("xq", "upper", 2)], [OK, NOT_REPRODUCIBLE]),
        (SAMPLED, [Answer("xqzzz", "upper", 5)], [WRONG_ANSWER]),  # more tokens than max_tokens
    ],
)
def test_check(planned: PlannedRequest, answers: list[Answer], kinds: list[str]) -> None:
    memo = ReproducibilityMemo()
    assert [check(planned, answer, memo).kind for answer in answers] == kinds


def test_reproducibility_is_per_identical_request() -> None:
    memo = ReproducibilityMemo()
    other_seed = PlannedRequest("upper", "hello", 4, temperature=0.8, top_p=0.9, top_k=0, seed=2)
    assert check(SAMPLED, Answer("xq", "upper", 3), memo).ok
    assert check(other_seed, Answer("zz", "upper", 3), memo).ok
    assert len(memo) == 2


def test_request_names() -> None:
    assert request_name("upper") == "generate[upper]"
    assert request_name("") == "generate[<base>]"


# --- ledger --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def run_ledger(events: list[tuple], final: bool = True) -> LedgerSnapshot:
    ledger = Ledger(clock=FakeClock())
    for event in events:
        if event[0] == "sent":
            ledger.sent(event[1], event[2])
        else:
            ledger.settled(event[1], event[2], *event[3:])
    ledger.final = final
    return ledger.snapshot()


A, B = "HTTP generate[upper]", "gRPC generate[<base>]"


@pytest.mark.parametrize(
    ("events", "final", "sent", "ok", "failures", "problems"),
    [
        ([("sent", "1", A), ("settled", "1", OK)], True, 1, 1, {}, []),
        (
            [
                ("sent", "1", A),
                ("sent", "2", B),
                ("settled", "2", "NOT_FOUND"),
                ("settled", "1", WRONG_ANSWER),
            ],
            True,
            2,
            0,
            {"NOT_FOUND": 1, WRONG_ANSWER: 1},
            [],
        ),
        (
            [("sent", "1", A)],
            True,
            1,
            0,
            {},
            ["1 request(s) sent without an outcome (e.g. 1)", "sent 1, settled 0"],
        ),
        (
            [("sent", "1", A), ("settled", "1", OK), ("settled", "1", OK)],
            True,
            1,
            1,
            {},
            ["1 request(s) given a second outcome (e.g. 1)"],
        ),
        (
            [("settled", "9", OK)],
            True,
            0,
            0,
            {},
            ["1 request(s) given an outcome without being sent (e.g. 9)"],
        ),
        (
            [("sent", "1", A), ("sent", "1", A), ("settled", "1", OK)],
            True,
            1,
            1,
            {},
            ["1 request(s) sent twice under one id (e.g. 1)"],
        ),
        ([("sent", "1", A), ("settled", "1", OK)], False, 1, 1, {}, ["the ledger was not closed"]),
        ([], True, 0, 0, {}, []),
    ],
    ids=[
        "ok",
        "typed-failures",
        "missing",
        "duplicate-outcome",
        "unknown-outcome",
        "duplicate-send",
        "not-final",
        "empty",
    ],
)
def test_reconcile(events, final, sent, ok, failures, problems) -> None:
    reconciliation = reconcile(run_ledger(events, final))
    assert (reconciliation.sent, reconciliation.ok, dict(reconciliation.failures)) == (sent, ok, failures)
    assert len(reconciliation.problems) == len(problems)
    for problem, expected in zip(reconciliation.problems, problems, strict=True):
        assert expected in problem
    assert reconciliation.clean == (not problems)


def test_ledger_tallies_tokens_bytes_and_its_window() -> None:
    snapshot = run_ledger(
        [("sent", "1", A), ("sent", "2", A), ("settled", "1", OK, 6, 5), ("settled", "2", OK, 4, 3)]
    )
    assert snapshot.tallies[A] == Tally(2, {OK: 2}, 10, 8)
    assert snapshot.duration_s == 2.0  # first send at t=101, last outcome at t=103


def test_snapshots_round_trip_through_json_and_merge() -> None:
    one = run_ledger([("sent", "1", A), ("settled", "1", OK, 3, 3)])
    two = run_ledger([("sent", "1", A), ("sent", "2", B), ("settled", "2", "UNAVAILABLE")], final=False)
    assert LedgerSnapshot.from_dict(json.loads(json.dumps(two.to_dict()))) == two
    merged = merge([one, two])
    assert merged.tallies[A] == Tally(2, {OK: 1}, 3, 3)
    assert merged.tallies[B] == Tally(1, {"UNAVAILABLE": 1}, 0, 0)
    assert merged.anomalies["missing"] == Anomaly(1, ("1",))
    assert not merged.final
    assert merge([one, one]).final
    assert not merge([]).final


def test_times_to_first_token_travel_with_the_ledger_and_make_the_reports_columns() -> None:
    one = run_ledger([("sent", "1", A), ("settled", "1", OK, 3, 3, 40.0)])
    two = run_ledger(
        [("sent", "1", A), ("sent", "2", A), ("settled", "1", OK, 3, 3, 90.0), ("settled", "2", OK)]
    )
    assert LedgerSnapshot.from_dict(json.loads(json.dumps(one.to_dict()))) == one
    merged = merge([one, two])
    assert sorted(merged.tallies[A].first_token_ms) == [40.0, 90.0]  # the request without a stream has none
    latency = Latency(3, 0, 100.0, 200.0, 300.0)
    summary = build_summary({A: latency}, {"generate[upper]": latency}, {"HTTP": latency}, latency, merged)
    assert (summary.rows[0].ttft_p50_ms, summary.rows[0].ttft_p95_ms) == (40.0, 90.0)
    table = format_table(summary)
    assert "| TTFT p50 ms | TTFT p95 ms |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 40 | 90 |")


# --- summary and verdict -------------------------------------------------------------------------------


def summary_of(failed: int = 0, locust_requests: int | None = None) -> Summary:
    events = [("sent", str(i), A) for i in range(4)] + [("sent", "b", B)]
    events += [("settled", str(i), OK if i >= failed else WRONG_ANSWER, 5, 5) for i in range(4)]
    events += [("settled", "b", OK, 7, 6)]
    snapshot = run_ledger(events)
    requests = 4 if locust_requests is None else locust_requests
    upper = Latency(requests, failed, 120.0, 300.0, 310.0)
    base = Latency(1, 0, 90.0, 90.0, 90.0)
    return build_summary(
        entries={A: upper, B: base},
        by_name={"generate[upper]": upper, "generate[<base>]": base},
        by_type={"HTTP": upper, "gRPC": base},
        total=Latency(requests + 1, failed, 110.0, 300.0, 310.0),
        snapshot=snapshot,
        failure_examples=[FailureExample("HTTP", "generate[upper]", "WRONG_ANSWER: ...", failed)]
        if failed
        else [],
    )


def test_summary_table() -> None:
    summary = summary_of()
    assert summary.duration_s == 5.0  # the first send at t=101, then an outcome a second, 5 in all
    assert format_table(summary) == "\n".join(
        [
            "| adapter | requests | failures | p50 ms | p95 ms | p99 ms | req/s | tokens/s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            "| `generate[<base>]` | 1 | 0 | 90 | 90 | 90 | 0.2 | 1.4 |",
            "| `generate[upper]` | 4 | 0 | 120 | 300 | 310 | 0.8 | 4.0 |",
            "| **HTTP** | 4 | 0 | 120 | 300 | 310 | 0.8 | 4.0 |",
            "| **gRPC** | 1 | 0 | 90 | 90 | 90 | 0.2 | 1.4 |",
            "| **all** | 5 | 0 | 110 | 300 | 310 | 1.0 | 5.4 |",
        ]
    )
    assert verdict(summary, 0) == []


def test_summary_round_trips_through_json() -> None:
    summary = summary_of(failed=2)
    assert Summary.from_dict(json.loads(json.dumps(summary.to_dict()))) == summary


def test_no_data_shows_as_a_dash() -> None:
    summary = build_summary({}, {"generate[upper]": Latency()}, {}, Latency(), run_ledger([]))
    assert "| `generate[upper]` | 0 | 0 | - | - | - | - | - |" in format_table(summary)


@pytest.mark.parametrize(
    ("summary", "exit_code", "reasons"),
    [
        (summary_of(), 0, []),
        (summary_of(failed=2), 1, ["2 failed request(s): generate[upper] (2)"]),
        (
            summary_of(locust_requests=5),
            1,
            ["Locust and the ledger disagree: HTTP generate[upper]: Locust counted 5"],
        ),
        (summary_of(), 2, ["Locust exited with code 2"]),
        (None, 1, ["Locust wrote no summary (exit code 1)"]),
        (
            build_summary({}, {}, {}, Latency(), run_ledger([])),
            0,
            ["no request was sent"],
        ),
        (
            build_summary({}, {}, {}, Latency(), run_ledger([], final=False)),
            0,
            ["no request was sent", "ledger: the ledger was not closed"],
        ),
    ],
)
def test_verdict(summary: Summary | None, exit_code: int, reasons: list[str]) -> None:
    got = verdict(summary, exit_code)
    assert len(got) == len(reasons), got
    for reason, expected in zip(got, reasons, strict=True):
        assert reason.startswith(expected)


# --- command line --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TrafficConfig(),
        TrafficConfig(
            adapters=("title", "upper"),
            popularity=Popularity("zipf", zipf_s=1.25),
            base_share=0.1,
            prompt_lengths=(4, 12),
            max_tokens=MaxTokensMix(0.5, 1, 2),
            default_max_tokens=32,
            sampling=Sampling(0.25, 0.6, 0.85, 7, 2, 8),
            seed=42,
            task_overrides=(("upper", "reverse"), ("title", "echo")),
            accuracy_file=None,
            miss_dtype="bfloat16",
        ),
        TrafficConfig(popularity=Popularity("hot", hot_count=2, hot_share=0.123456789)),
    ],
    ids=["default", "everything", "hot"],
)
def test_traffic_options_round_trip(config: TrafficConfig) -> None:
    parser = build_parser()
    args = parser.parse_args(["run", *traffic_argv(config)])
    assert traffic_config(args) == config


def test_traffic_option_errors_name_the_option() -> None:
    parser = build_parser()
    for argv, message in [
        (["--popularity", "zipf"], "popularity 'zipf'"),
        (["--prompt-lengths", "7"], "prompt lengths '7': expected MIN-MAX"),
        (["--max-tokens-mix", "1:1"], "expected OMIT:TRUNCATE:AMPLE"),
        (["--task-override", "upper"], "expected ADAPTER=TASK"),
    ]:
        with pytest.raises(ValueError, match=message):
            traffic_config(parser.parse_args(["run", *argv]))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20), ("20", 20), ("10m", 600), ("1h30m", 5400), ("1m30s", 90), ("2.5s", 2.5), (" 5s ", 5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "abc", "10x", "m", "-5s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("protocol", "classes"),
    [
        ("http", ["HttpGenerateUser"]),
        ("grpc", ["GrpcGenerateUser"]),
        ("both", ["HttpGenerateUser", "GrpcGenerateUser"]),
    ],
)
def test_locust_command(protocol: str, classes: list[str], tmp_path: Path) -> None:
    settings = LoadSettings(
        http_url="h:1",
        grpc_url="h:2",
        users=24,
        spawn_rate=12,
        duration_s=20,
        protocol=protocol,
        request_timeout_s=30,
        traffic=TrafficConfig(base_share=0.25),
    )
    command = locust_command(settings, tmp_path, "run-1")
    assert command[:5] == [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    flags = dict(zip(command[5::1], command[6::1], strict=False))
    assert flags["-u"] == "24" and flags["-r"] == "12" and flags["-t"] == "20s"
    assert flags["--stop-timeout"] == "40"  # past the request timeout, so no request is cut off
    assert flags["--csv"] == str(tmp_path / "locust") and flags["--html"] == str(tmp_path / "report.html")
    assert flags["--triton-http"] == "h:1" and flags["--triton-grpc"] == "h:2"
    assert flags["--report-dir"] == str(tmp_path) and flags["--run-id"] == "run-1"
    assert flags["--base-share"] == "0.25"
    assert "--headless" in command
    assert command[-len(classes) :] == classes


def test_locust_command_for_the_web_ui(tmp_path: Path) -> None:
    command = locust_command(LoadSettings(), tmp_path, "ui", headless=False, web_port=9999)
    assert "--headless" not in command and "-t" not in command and "--csv" not in command
    assert command[command.index("--html") + 1] == str(tmp_path / "report.html")
    assert command[command.index("--web-port") + 1] == "9999"


def test_cli_settings_and_per_command_defaults() -> None:
    parser = build_parser()
    run = parser.parse_args(["run", "--host", "10.0.0.2", "--http-port", "9000", "--duration", "2m"])
    assert (run.host, run.http_port, run.grpc_port, run.duration) == ("10.0.0.2", 9000, 8001, 120.0)
    soak = parser.parse_args(["soak"])
    assert (soak.duration, soak.popularity, soak.sampled_share) == (600.0, "zipf:1", 0.2)
    assert traffic_config(soak).sampling.share == 0.2
    bench = parser.parse_args(["bench", "--users-list", "2,4"])
    assert (bench.users_list, bench.spawn_rate, bench.duration) == ((2, 4), None, 60.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--users-list", "0,4"])


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"users": 0}, "users must be >= 1"),
        ({"spawn_rate": 0}, "spawn rate must be > 0"),
        ({"protocol": "udp"}, "protocol must be one of"),
        ({"request_timeout_s": 0}, "request timeout must be > 0"),
        ({"think_time_s": -1}, "think time must be >= 0"),
    ],
)
def test_load_settings_refuse(fields: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        LoadSettings(**fields)


def test_new_report_dirs_never_collide(tmp_path: Path) -> None:
    first, second = new_report_dir(tmp_path), new_report_dir(tmp_path)
    assert first != second and first.is_dir() and second.is_dir()


# --- soak memory and bench -----------------------------------------------------------------------------


def samples(mib_at: list[tuple[float, float]]) -> list[MemorySample]:
    return [MemorySample(t, {"tritonserver": int(mib * MIB)}) for t, mib in mib_at]


def test_memory_growth_is_fitted_after_the_warmup() -> None:
    # A warm-up jump to 1000 MiB, then +10 MiB over 360 s: 100 MiB/h on 1000 MiB is 10%/h.
    series = [(0, 500), (30, 900)] + [(60 + 36 * i, 1000 + i) for i in range(11)]
    growth = fit_growth(samples(series), warmup_s=60)
    assert growth is not None and growth.samples == 11
    assert growth.slope_mib_per_hour == pytest.approx(100)
    assert growth.percent_per_hour == pytest.approx(10)
    assert not growth.meets_goal
    flat = fit_growth(samples([(t, 800) for t in range(0, 600, 5)]), warmup_s=60)
    assert flat is not None and flat.percent_per_hour == pytest.approx(0, abs=1e-9) and flat.meets_goal


def test_memory_growth_needs_samples_after_the_warmup() -> None:
    assert fit_growth(samples([(0, 1), (10, 1), (20, 1), (30, 1)]), warmup_s=25) is None


def test_bench_table_and_plot(tmp_path: Path) -> None:
    points = [
        BenchPoint(8, 800, 0, 13.3, 160.0, 410.0, 800.0, 1200.0, True),
        BenchPoint(32, 900, 2, 15.0, 180.5, 1900.0, 3000.0, 4100.0, False),
    ]
    table = bench_markdown(points, date="2026-12-02", duration_s=60, setting="protocol both")
    assert "| 8 | 800 | 0 | 13.3 | 160.0 | 410 | 800 | 1200 | pass |" in table
    assert "| 32 | 900 | 2 | 15.0 | 180.5 | 1900 | 3000 | 4100 | FAIL |" in table
    assert "2026-12-02" in table and "usable cores" in table
    plot(points, tmp_path / "bench.png", "test")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_point_from_a_summary() -> None:
    point = BenchPoint.of(16, summary_of(), passed=True)
    assert (point.users, point.requests, point.p99_ms, point.rps) == (16, 5, 310.0, 1.0)
    assert not math.isnan(point.tokens_per_s)


def test_stat_keys_name_type_and_request() -> None:
    assert stat_key("gRPC", "generate[<base>]") == "gRPC generate[<base>]"
