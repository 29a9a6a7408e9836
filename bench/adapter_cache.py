"""The adapter cache, in-process: cold adapters, a thousand adapters in the store, and a working set larger
than the device budget. Ratios measured side by side in one run (``python -m bench.adapter_cache``, part of
``make bench``).

The model is the bench model (bench/fixture.py). The store holds STORE_SIZE adapters: folders ``s0000`` ...
whose files are hard links to the bench's 8 LoRA adapters in turn (real folders and files, loaded and
validated each on its own; no disk cost). Traffic runs through the engine loop from CONCURRENCY client
threads, each sending its next request as soon as the last is answered (greedy, NEW_TOKENS tokens, EOS
off by the bench model's random weights).

- Cold adapter: a request for an adapter only in the store (loaded, validated, copied in) against the same
  request once the adapter is resident, one after the other, alone; and the load's rate (adapter bytes over
  the extra time).
- Scale: Zipf traffic (exponent ZIPF_S) over IN_USE adapters of the store, all resident, against the same
  requests on one adapter; rounds alternate. Beside it, field.md's bandwidth bound for the expected number of
  distinct adapters among CONCURRENCY rows (bench/bound.py): each distinct adapter adds its A and B bytes to
  a decode step that otherwise reads the base's adapted weights once.
- Working set larger than the device: the same Zipf traffic with a device budget of a third of the working
  set (host memory holds it all): hit rate, loads, and throughput against the all-resident run.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest

from bench import outputs
from bench.bound import LoraBound
from bench.fixture import BENCH_SPEC, QUICK_SPEC, build_fixture
from bench.machine import machine_info, usable_cores

STORE_SIZE = 1000
IN_USE = 100
ZIPF_S = 1.0
CONCURRENCY = 16
NEW_TOKENS = 16
PROMPT_TOKENS = 16
# Goals of issue 11.
GOAL_COLD = 1.5
GOAL_SCALE = 0.97


@dataclass
class Measures:
    machine: dict
    spec: str
    store_size: int
    in_use: int
    adapter_bytes: int
    cold_ms: list[float]
    warm_ms: list[float]
    cold_over_warm: float
    load_mb_per_s: float
    one_adapter_rps: list[float]
    many_adapters_rps: list[float]
    scale_ratio: float
    distinct_per_step: float
    scale_bound: float
    small_device_rps: list[float]
    small_device_ratio: float
    hit_rate: float
    loads: int
    requests: int


def build_store(adapters: Path, ids: Sequence[str], store: Path, size: int) -> list[str]:
    """`size` adapter folders under `store`, each linking to the files of one of `ids` in turn."""
    names = [f"s{i:04d}" for i in range(size)]
    store.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        folder = store / name
        if folder.is_dir():
            continue
        staging = store.parent / f".{name}.staging"
        staging.mkdir(exist_ok=True)
        for file in (adapters / ids[i % len(ids)]).iterdir():
            target = staging / file.name
            if not target.exists():
                try:
                    os.link(file, target)
                except OSError:  # another filesystem: copy instead
                    target.write_bytes(file.read_bytes())
        os.replace(staging, folder)
    return names


def engine_for(fixture, store: Path, device_bytes: int, host_bytes: int) -> Engine:
    config = EngineConfig(
        base_model=fixture.base_model,
        adapter_dir=store,
        max_adapters=IN_USE + 8,
        max_batch_rows=CONCURRENCY,
        preload_adapters=(),
        adapter_device_bytes=device_bytes,
        adapter_host_bytes=host_bytes,
    )
    engine = Engine.load(config)
    engine.start_loop()
    return engine


def prompts(vocab: int, count: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, PROMPT_TOKENS).tolist() for _ in range(count)]


def one(engine: Engine, prompt: list[int], adapter: str) -> float:
    start = time.perf_counter()
    (outcome,) = engine.generate([GenerationRequest(prompt, adapter, max_tokens=NEW_TOKENS)])
    if isinstance(outcome, Exception):
        raise outcome
    return time.perf_counter() - start


def traffic(engine: Engine, requests: list[tuple[list[int], str]]) -> float:
    """Requests per second for `requests` sent by CONCURRENCY clients, each one at a time."""
    queue = list(reversed(requests))
    lock = threading.Lock()
    errors: list[Exception] = []

    def client() -> None:
        while True:
            with lock:
                if not queue:
                    return
                prompt, adapter = queue.pop()
            try:
                one(engine, prompt, adapter)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed: {errors[0]}")
    return len(requests) / (time.perf_counter() - start)


def zipf_weights(count: int) -> np.ndarray:
    """P(rank k) for k = 1..count, proportional to 1 / k^ZIPF_S."""
    weights = 1.0 / np.arange(1, count + 1) ** ZIPF_S
    return weights / weights.sum()


def expected_distinct(count: int, rows: int) -> float:
    """Expected distinct adapters among `rows` independent Zipf draws over `count` adapters."""
    return float(np.sum(1 - (1 - zipf_weights(count)) ** rows))


def zipf_adapters(names: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` draws over `names` with P(rank k) proportional to 1 / k^ZIPF_S."""
    rng = np.random.default_rng(seed)
    return [names[i] for i in rng.choice(len(names), size=count, p=zipf_weights(len(names)))]


def run(quick: bool, out: Path) -> Measures:
    spec = QUICK_SPEC if quick else BENCH_SPEC
    fixture, _ = build_fixture(spec, out / f"model-{'quick' if quick else 'full'}")
    store_size, in_use = (120, 20) if quick else (STORE_SIZE, IN_USE)
    names = build_store(
        fixture.adapter_dir, spec.adapter_ids(), out / "cache-store" / spec_name(quick), store_size
    )
    trials, per_round, rounds = (3, 32, 1) if quick else (12, 192, 3)
    progress(f"store of {store_size} adapters; {in_use} in use; {CONCURRENCY} clients")

    # Cold against warm, all budgets ample.
    engine = engine_for(fixture, out / "cache-store" / spec_name(quick), 1 << 30, 2 << 30)
    try:
        prompt = prompts(spec.vocab, 1, seed=1)[0]
        one(engine, prompt, "")  # warm the model itself
        cold, warm = [], []
        for i in range(trials):
            adapter = names[-1 - i]  # never used before
            cold.append(one(engine, prompt, adapter))
            warm.append(one(engine, prompt, adapter))
        adapter_bytes = next(r.nbytes for r in engine.adapters.listing() if r.adapter_id == names[-1])
        extra = statistics.median(cold) - statistics.median(warm)
        progress(f"cold {statistics.median(cold) * 1e3:.1f} ms, warm {statistics.median(warm) * 1e3:.1f} ms")

        # Scale: IN_USE adapters resident, Zipf traffic over them, against one adapter.
        hot = names[:in_use]
        engine.adapters.preload(hot)
        one_rps, many_rps = [], []
        for r in range(rounds):
            batch = prompts(spec.vocab, per_round, seed=100 + r)
            spread = zipf_adapters(hot, per_round, seed=200 + r)
            one_rps.append(traffic(engine, [(p, hot[0]) for p in batch]))
            many_rps.append(traffic(engine, list(zip(batch, spread, strict=True))))
            progress(
                f"round {r + 1}: 1 adapter {one_rps[-1]:.2f} req/s, {in_use} adapters {many_rps[-1]:.2f}"
            )
    finally:
        engine.stop_loop()

    # The working set (in_use adapters) three times the device budget; host memory holds it all.
    engine = engine_for(fixture, out / "cache-store" / spec_name(quick), in_use * adapter_bytes // 3, 2 << 30)
    try:
        engine.adapters.preload(hot)
        loads_before = engine.adapters.device_loads
        small_rps = []
        total = 0
        for r in range(rounds):
            batch = prompts(spec.vocab, per_round, seed=100 + r)
            spread = zipf_adapters(hot, per_round, seed=200 + r)
            small_rps.append(traffic(engine, list(zip(batch, spread, strict=True))))
            total += per_round
            progress(f"round {r + 1}: device budget {in_use // 3} adapters: {small_rps[-1]:.2f} req/s")
        loads = engine.adapters.device_loads - loads_before
    finally:
        engine.stop_loop()
    return Measures(
        machine=machine_info(),
        spec=spec_name(quick),
        store_size=store_size,
        in_use=in_use,
        adapter_bytes=adapter_bytes,
        cold_ms=[c * 1e3 for c in cold],
        warm_ms=[w * 1e3 for w in warm],
        cold_over_warm=statistics.median(cold) / statistics.median(warm),
        load_mb_per_s=adapter_bytes / 1e6 / extra if extra > 0 else float("inf"),
        one_adapter_rps=one_rps,
        many_adapters_rps=many_rps,
        scale_ratio=statistics.median(m / o for m, o in zip(many_rps, one_rps, strict=True)),
        distinct_per_step=expected_distinct(in_use, CONCURRENCY),
        scale_bound=1 / LoraBound.for_spec(spec).mixed_over_single(expected_distinct(in_use, CONCURRENCY)),
        small_device_rps=small_rps,
        small_device_ratio=statistics.median(s / m for s, m in zip(small_rps, many_rps, strict=True)),
        hit_rate=1 - loads / total,
        loads=loads,
        requests=total,
    )


def spec_name(quick: bool) -> str:
    return "quick" if quick else "full"


def progress(message: str) -> None:
    print(f"[cache] {message}", file=sys.stderr, flush=True)


def report(m: Measures) -> str:
    met = {True: "met", False: "not met"}
    cold, warm = statistics.median(m.cold_ms), statistics.median(m.warm_ms)
    many = ", ".join(f"{x:.1f}" for x in m.many_adapters_rps)
    single = ", ".join(f"{x:.1f}" for x in m.one_adapter_rps)
    return "\n".join(
        [
            f"# The adapter cache ({m.spec} bench model, in-process, {CONCURRENCY} clients)",
            "",
            f"Machine: {m.machine.get('cpu_model', '?')}, {m.machine.get('usable_cores', '?')} usable cores, "
            "fp32.",
            "",
            "| measure | value | goal |",
            "|---|---|---|",
            f"| cold adapter: first request / warm request (median of {len(m.cold_ms)}) | "
            f"{m.cold_over_warm:.2f}x ({cold:.1f} / {warm:.1f} ms) | <= {GOAL_COLD}x, "
            f"{met[m.cold_over_warm <= GOAL_COLD]} |",
            f"| load rate: adapter bytes / extra time of the cold request | {m.load_mb_per_s:.0f} MB/s "
            f"({m.adapter_bytes / 1e6:.2f} MB each) | |",
            f"| {m.in_use} adapters in use of {m.store_size}, Zipf {ZIPF_S} / 1 adapter, throughput | "
            f"{m.scale_ratio:.3f} ({many} / {single} req/s) | >= {GOAL_SCALE}, "
            f"{met[m.scale_ratio >= GOAL_SCALE]}; bound {m.scale_bound:.2f} |",
            f"| working set 3x the device budget: throughput / all resident | {m.small_device_ratio:.3f} "
            f"(device hit rate {m.hit_rate:.1%}: {m.loads} copies in from host memory, {m.requests} "
            "requests) | |",
            "",
            f"Bound (field.md, bandwidth): {m.distinct_per_step:.1f} distinct adapters expected among "
            f"{CONCURRENCY} rows, each adding its A and B bytes to a decode step: 1 adapter / "
            f"{m.distinct_per_step:.1f} adapters <= {m.scale_bound:.2f}.",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = outputs.parser(
        "python -m bench.adapter_cache", __doc__, "a small store and few requests (a smoke run)"
    )
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    measures = run(args.quick, args.out)
    outputs.write(args.out, "adapter_cache", report(measures), asdict(measures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
