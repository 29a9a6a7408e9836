"""Where a served request's time goes: the same requests in-process and through the real server, side by side
(``python -m bench.served_path``, part of ``make bench``; issue 14's served / in-process goal).

On the demo model, N requests over its LoRA adapters (greedy, MAX_TOKENS tokens, concurrency CONCURRENCY):

- in-process, batched: `Engine.generate` of CONCURRENCY requests at a time (the engine alone: no client
  threads, no server);
- in-process, CONCURRENCY client threads each submitting one request at a time to the engine loop (what the
  server's model does, without Triton);
- served through `generate` over gRPC (the front model, then BLS to the engine's model);
- served through `generate_stream` over gRPC streaming, one final chunk per request (`stream` false: the
  engine's model without the front).

Rounds alternate the four paths; every served answer must equal the in-process one. Ratios are throughputs
over the in-process batched path's, within each round.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import outputs

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEMO = PROJECT_ROOT / "models" / "demo"
DEMO_ADAPTERS = ("upper", "reverse", "rot13")
CONCURRENCY = 16
MAX_TOKENS = 32
GOAL = 0.7  # issue 14: served / in-process throughput at c = 16
PATHS = ("in-process batched", "in-process threads", "served generate", "served generate_stream")


@dataclass
class Report:
    machine: dict
    requests: int
    rounds: int
    throughput: dict[str, list[float]]  # path -> req/s per round
    ratios: dict[str, list[float]]  # path -> its throughput / the batched in-process path's, per round
    identical: dict[str, int]  # served path -> answers equal to the in-process ones (of `requests`)

    def median(self, path: str) -> float:
        return statistics.median(self.ratios[path])


def measure(grpc_url: str, engine, codec, texts: Sequence[str], rounds: int) -> Report:
    """The four paths over `texts` (request i on adapter i mod 3), `rounds` rounds after one warm-up."""
    from multiadapter.engine import GenerationRequest, GenerationResult

    from bench.machine import machine_info
    from bench.serving import fire
    from bench.timing import run_concurrently
    from client import GenerateRequest
    from client.streaming import stream_generate

    served = [GenerateRequest(t, DEMO_ADAPTERS[i % 3], max_tokens=MAX_TOKENS) for i, t in enumerate(texts)]
    local = [
        GenerationRequest(codec.encode(r.text.encode()), r.adapter_id, max_tokens=MAX_TOKENS) for r in served
    ]

    def text(outcome) -> str | None:  # a RequestError counts as a failed request, as a served one does
        return codec.decode(outcome.output_ids) if isinstance(outcome, GenerationResult) else None

    def batched() -> tuple[list[str | None], float]:
        start, answers = time.perf_counter(), []
        for k in range(0, len(local), CONCURRENCY):
            answers += [text(o) for o in engine.generate(local[k : k + CONCURRENCY])]
        return answers, time.perf_counter() - start

    def threads() -> tuple[list[str | None], float]:
        return run_concurrently(CONCURRENCY, len(local), lambda i: text(engine.generate([local[i]])[0]))

    def front() -> tuple[list[str | None], float]:
        return fire(grpc_url, [("generate", r) for r in served], CONCURRENCY)

    def stream() -> tuple[list[str], float]:
        def one(i: int) -> str:
            return "".join(c.text for c in stream_generate(grpc_url, "grpc", served[i], stream=False))

        return run_concurrently(CONCURRENCY, len(served), one)

    paths = dict(zip(PATHS, (batched, threads, front, stream), strict=True))
    for path in paths.values():  # warm-up
        path()
    throughput: dict[str, list[float]] = {p: [] for p in PATHS}
    answers: dict[str, list] = {}
    for round_index in range(rounds):
        order = list(PATHS)
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            texts_out, wall = paths[name]()
            answers.setdefault(name, texts_out)
            throughput[name].append(sum(t is not None for t in texts_out) / wall)
    base = throughput[PATHS[0]]
    ratios = {p: [a / b for a, b in zip(throughput[p], base, strict=True)] for p in PATHS}
    truth = answers[PATHS[0]]
    identical = {p: sum(a == b for a, b in zip(answers[p], truth, strict=True)) for p in PATHS[1:]}
    return Report(machine_info(), len(texts), rounds, throughput, ratios, identical)


def to_markdown(report: Report) -> str:
    machine = report.machine
    lines = [
        "## Served against in-process throughput (python -m bench.served_path)",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} usable cores; the "
        f"demo model, {report.requests} requests over {len(DEMO_ADAPTERS)} LoRA adapters, {MAX_TOKENS} "
        f"tokens, concurrency {CONCURRENCY}, {report.rounds} alternating rounds.",
        "",
        "| path | req/s (median) | over in-process batched | per round | identical answers |",
        "|---|---:|---:|---|---:|",
    ]
    for path in PATHS:
        spread = ", ".join(f"{r:.2f}" for r in report.ratios[path])
        same = "-" if path == PATHS[0] else f"{report.identical[path]} / {report.requests}"
        lines.append(
            f"| {path} | {statistics.median(report.throughput[path]):.1f} | **{report.median(path):.2f}** | "
            f"{spread} | {same} |"
        )
    met = report.median("served generate") >= GOAL
    lines += [
        "",
        f"Goal (issue 14): served `generate` / in-process >= {GOAL}: {'met' if met else '**not met**'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine
    from multiadapter.tokenization import TextCodec

    from bench.machine import usable_cores
    from client.compare import random_prompts
    from server.process import start_server

    parser = outputs.parser("python -m bench.served_path", __doc__, "few requests, one round (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (5)")
    args = parser.parse_args(argv)
    requests, rounds = (32, 1) if args.quick else (96, args.rounds)
    # The in-process engine gets the machine's cores, as the served engine's process does.
    torch.set_num_threads(usable_cores())
    engine = Engine.load(EngineConfig(base_model=DEMO / "base", adapter_dir=DEMO / "adapters"))
    engine.start_loop()
    codec = TextCodec.load(DEMO / "base")
    args.out.mkdir(parents=True, exist_ok=True)
    server = start_server(
        PROJECT_ROOT / "model_repository",
        DEMO / "base",
        DEMO / "adapters",
        log_path=args.out / "tritonserver-served-path.log",
        ready_timeout_s=600,
    )
    try:
        report = measure(server.grpc_url, engine, codec, random_prompts(requests, seed=7, max_len=16), rounds)
    finally:
        server.stop()
        engine.stop_loop()
    outputs.write(args.out, "served_path", to_markdown(report), asdict(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
