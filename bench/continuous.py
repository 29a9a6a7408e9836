"""Through the real server: continuous batching against request-level batching, side by side in one run.

``python -m bench.continuous`` (part of ``make bench``) starts one tritonserver serving two engines of the
bench model (bench/fixture.py: 8 layers, hidden 512, 1024 positions, 8 LoRA and 3 bottleneck adapters; the
demo model's 64-token context cannot hold max_tokens up to 128): ``generate_stream`` (continuous batching,
the default) and ``generate_stream_request`` (the same model with ``batching=request``: each Triton batch
generated to its end before the next, the old behaviour). Rounds alternate between the two, same requests:

- staggered arrivals: CONCURRENCY clients start 50 ms apart, each sending its next request as soon as the
  last is answered; ``max_tokens`` drawn from 4..128, adapters round-robin over the bank and the base (the
  random weights rarely emit EOS, so answers run to ``max_tokens``);
- each request sent over gRPC with ``stream`` false (one response, like ``generate``): throughput and latency;
- then streamed, one at a time and CONCURRENCY at once: time to first token (the first response;
  request-level batching sends one response, so its first token comes with its whole answer).

It reports throughput (requests and generated tokens per second), p50 / p95 latency, the p95 latency of the
short requests (max_tokens <= SHORT_TOKENS), time to first token, the decode rows per step each engine
reached (from its own metrics), and whether both engines gave identical greedy answers. Results go to stdout
and <out>/continuous.md, <out>/continuous.json. ``--quick`` runs few requests (a smoke run).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench import outputs
from bench.fixture import ModelSpec
from bench.machine import machine_info
from client.api import GenerateRequest, RequestFailed
from client.compare import random_prompts
from client.streaming import stream_generate

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONTINUOUS, REQUEST = "generate_stream", "generate_stream_request"
CONCURRENCY = 16
MAX_TOKENS = (4, 128)
SHORT_TOKENS = 16
STAGGER_S = 0.05
# Goals of issue 10.
GOAL_THROUGHPUT = 2.0
GOAL_SHORT_P95 = 5.0


@dataclass
class Outcome:
    max_tokens: int
    latency_s: float = float("nan")
    first_text_s: float = float("nan")
    generated: int = 0
    text: str | None = None
    error: str = ""


@dataclass
class Run:
    """One engine's rounds: every outcome, and the wall time of its loaded rounds."""

    model: str
    outcomes: list[Outcome] = field(default_factory=list)
    wall_s: float = 0.0
    rows_per_step: float = float("nan")
    first_text_c1: list[float] = field(default_factory=list)
    first_text_c16: list[float] = field(default_factory=list)

    def ok(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.error]

    @property
    def throughput(self) -> float:
        return len(self.ok()) / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return sum(o.generated for o in self.ok()) / self.wall_s

    def latency(self, q: float, short_only: bool = False) -> float:
        values = [o.latency_s for o in self.ok() if not short_only or o.max_tokens <= SHORT_TOKENS]
        return percentile(values, q)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def workload(n: int, adapters: Sequence[str], seed: int) -> list[GenerateRequest]:
    rng = random.Random(seed)
    return [
        GenerateRequest(prompt, adapters[i % len(adapters)], max_tokens=rng.randint(*MAX_TOKENS))
        for i, prompt in enumerate(random_prompts(n, seed=seed, max_len=24))
    ]


def one(url: str, model: str, request: GenerateRequest, stream: bool = False) -> Outcome:
    outcome = Outcome(int(request.max_tokens or 0))
    start = time.perf_counter()
    parts = []
    try:
        for chunk in stream_generate(url, "grpc", request, model=model, timeout_s=300, stream=stream):
            if not parts:
                outcome.first_text_s = time.perf_counter() - start
            parts.append(chunk.text)
            outcome.generated = chunk.generated_tokens
    except RequestFailed as failure:
        outcome.error = f"{failure.code}: {failure.message}"
        return outcome
    outcome.latency_s = time.perf_counter() - start
    outcome.text = "".join(parts)
    return outcome


def loaded_round(
    url: str, model: str, requests: Sequence[GenerateRequest], stream: bool = False
) -> tuple[list[Outcome], float]:
    """CONCURRENCY clients, started STAGGER_S apart, each taking the next request when it is answered."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()

    def client(k: int) -> None:
        time.sleep(k * STAGGER_S)
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            outcomes[i] = one(url, model, requests[i], stream)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [o for o in outcomes if o is not None], time.perf_counter() - start


def scrape(metrics_url: str, name: str, model: str) -> float:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{metrics_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'model="{model}"' in line
    )


def two_engine_repository(target: Path) -> Path:
    """The project's repository plus `generate_stream_request`: the same engine with batching=request."""
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(PROJECT_ROOT / "model_repository", target)
    source, copy = target / CONTINUOUS, target / REQUEST
    shutil.copytree(source, copy)
    config = (copy / "config.pbtxt").read_text()
    batching = 'parameters: { key: "batching" value: { string_value: "continuous" } }'
    if batching not in config:
        raise RuntimeError(f"{copy / 'config.pbtxt'}: no batching parameter to set")
    config = config.replace(f'name: "{CONTINUOUS}"', f'name: "{REQUEST}"')
    (copy / "config.pbtxt").write_text(config.replace(batching, batching.replace("continuous", "request")))
    return target


def measure(server, requests: Sequence[GenerateRequest], rounds: int, c1: int, log: Callable[[str], None]):
    runs = {model: Run(model) for model in (CONTINUOUS, REQUEST)}
    # Warm-up: one request each (first-call allocations), not measured.
    for model in runs:
        one(server.grpc_url, model, requests[0])
    steps_before = {m: scrape(server.metrics_url, "multiadapter_batches_total", m) for m in runs}
    rows_before = {m: scrape(server.metrics_url, "multiadapter_batch_rows_total", m) for m in runs}
    for r in range(rounds):
        for model, run in runs.items():
            outcomes, wall_s = loaded_round(server.grpc_url, model, requests)
            run.outcomes += outcomes
            run.wall_s += wall_s
            failed = sum(1 for o in outcomes if o.error)
            log(f"round {r + 1}/{rounds} {model}: {len(outcomes) / wall_s:.2f} req/s, {failed} failed")
    for model, run in runs.items():
        steps = scrape(server.metrics_url, "multiadapter_batches_total", model) - steps_before[model]
        rows = scrape(server.metrics_url, "multiadapter_batch_rows_total", model) - rows_before[model]
        run.rows_per_step = rows / steps if steps else float("nan")
        for request in requests[:c1]:
            outcome = one(server.grpc_url, model, request, stream=True)
            if not outcome.error:
                run.first_text_c1.append(outcome.first_text_s)
        streamed, _ = loaded_round(server.grpc_url, model, requests[:CONCURRENCY], stream=True)
        run.first_text_c16 = [o.first_text_s for o in streamed if not o.error]
    return runs


def agreement(runs: dict[str, Run], n: int) -> tuple[int, int]:
    """Requests of the first round whose greedy answers are identical on both engines."""
    a, b = runs[CONTINUOUS].outcomes[:n], runs[REQUEST].outcomes[:n]
    same = sum(1 for x, y in zip(a, b, strict=True) if x.text is not None and x.text == y.text)
    return same, n


def to_markdown(
    runs: dict[str, Run],
    agreeing: tuple[int, int],
    machine: dict[str, object],
    rounds: int,
    spec: ModelSpec,
) -> str:
    adapters = spec.bank_size
    cont, req = runs[CONTINUOUS], runs[REQUEST]
    throughput = cont.throughput / req.throughput
    short = req.latency(95, short_only=True) / cont.latency(95, short_only=True)
    per_request = len(cont.outcomes) // max(1, rounds)
    lines = [
        "## Continuous batching vs request-level batching, through the real server",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} usable cores, CPU, "
        "fp32. "
        f"Bench model ({spec.layers} layers, hidden {spec.hidden}), adapters round-robin over the base and "
        f"{adapters} adapters; "
        f"{per_request} requests per "
        f"round, {rounds} alternating rounds per engine; gRPC, one response per request, {CONCURRENCY} "
        "clients started "
        f"{STAGGER_S * 1e3:.0f} ms apart; max_tokens uniform in {MAX_TOKENS[0]}..{MAX_TOKENS[1]}; short = "
        f"max_tokens <= {SHORT_TOKENS}.",
        "",
        "| engine | req/s | tokens/s | p50 | p95 | p95 short | first token p50, c=1 | first token p50, "
        f"c={CONCURRENCY} | rows / decode step | failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, run in (("continuous", cont), ("request-level", req)):
        lines.append(
            f"| {label} | {run.throughput:.2f} | {run.tokens_per_s:.0f} | {run.latency(50):.2f} s | "
            f"{run.latency(95):.2f} s | {run.latency(95, True):.2f} s | "
            f"{percentile(run.first_text_c1, 50) * 1e3:.0f} ms | "
            f"{percentile(run.first_text_c16, 50) * 1e3:.0f} ms | {run.rows_per_step:.1f} | "
            f"{len(run.outcomes) - len(run.ok())} |"
        )
    lines += [
        "",
        "| measure | continuous / request-level | goal | met |",
        "|---|---:|---|---|",
        f"| throughput | **{throughput:.2f}x** | >= {GOAL_THROUGHPUT:.0f}x | "
        f"{'yes' if throughput >= GOAL_THROUGHPUT else '**no**'} |",
        f"| p95 latency of short requests, lower by | **{short:.2f}x** | >= {GOAL_SHORT_P95:.0f}x | "
        f"{'yes' if short >= GOAL_SHORT_P95 else '**no**'} |",
        "",
        f"Identical greedy answers from both engines: {agreeing[0]} / {agreeing[1]} (first round).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = outputs.parser("python -m bench.continuous", __doc__, "few requests, one round (a smoke run)")
    parser.add_argument("--requests", type=int, default=96, help="requests per round (96)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per engine (3)")
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1:
        parser.error("--requests and --rounds must be >= 1")
    n, rounds, c1 = (CONCURRENCY, 1, 2) if args.quick else (args.requests, args.rounds, 16)
    args.out.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(f"[bench.continuous] {message}", file=sys.stderr, flush=True)

    from bench.fixture import BENCH_SPEC, QUICK_SPEC, build_fixture  # noqa: PLC0415
    from server.process import start_server

    spec = QUICK_SPEC if args.quick else BENCH_SPEC
    fixture, _ = build_fixture(spec, args.out / ("model-quick" if args.quick else "model-full"))
    adapters = ("", *spec.adapter_ids(), *spec.bottleneck_kinds)
    work = args.out / "continuous"
    log("starting tritonserver with both engines")
    server = start_server(
        two_engine_repository(work / "model_repository"),
        fixture.base_model,
        fixture.adapter_dir,
        log_path=work / "tritonserver.log",
        ready_timeout_s=900,
        base_env={**os.environ, "MULTIADAPTER_BACKEND_SRC": str(PROJECT_ROOT / "backend_src")},
    )
    try:
        requests = workload(n, adapters, seed=10)
        runs = measure(server, requests, rounds, c1, log)
    finally:
        server.stop()
    machine = machine_info()
    markdown = to_markdown(runs, agreement(runs, n), machine, rounds, spec)
    summary = {
        "machine": machine,
        "runs": {m: {**asdict(r), "throughput": r.throughput} for m, r in runs.items()},
        "ok": all(not o.error for r in runs.values() for o in r.outcomes),
    }
    outputs.write(args.out, "continuous", markdown, summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
