"""A short bench for `make gpu-check`: mixed-adapter throughput on one device, bf16 on CUDA (fp32 on the CPU).

``python -m bench.gpu_check --device cuda`` loads the bench model (bench/fixture.py) with its 8 LoRA adapters
into the engine loop and sends ROUNDS alternating rounds of REQUESTS greedy requests from CONCURRENCY client
threads: all on one adapter, then spread over every adapter of the bank. It prints generated tokens per
second for both and their ratio (the issue-14 measure "8 distinct adapters / 1 adapter"), side by side in
one run. `--quick` uses the small bench model (a smoke run on the CPU: tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine

from bench.adapter_cache import CONCURRENCY, prompts, traffic
from bench.fixture import BENCH_SPEC, QUICK_SPEC, build_fixture
from bench.machine import machine_info

ROUNDS = 3
REQUESTS = 64


def run(device: torch.device, quick: bool, out: Path) -> dict[str, object]:
    spec = QUICK_SPEC if quick else BENCH_SPEC
    fixture, _ = build_fixture(spec, out / f"model-{'quick' if quick else 'full'}")
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    config = EngineConfig(
        base_model=fixture.base_model,
        adapter_dir=fixture.adapter_dir,
        dtype=dtype,
        max_batch_rows=CONCURRENCY,
    )
    engine = Engine.load(config, device)
    engine.start_loop()
    lora = list(spec.adapter_ids())
    one, mixed = [], []
    try:
        count, rounds = (16, 1) if quick else (REQUESTS, ROUNDS)
        traffic(engine, [(p, lora[0]) for p in prompts(spec.vocab, CONCURRENCY, seed=0)])  # warm-up
        for r in range(rounds):
            batch = prompts(spec.vocab, count, seed=10 + r)
            one.append(traffic(engine, [(p, lora[0]) for p in batch]))
            mixed.append(traffic(engine, [(p, lora[i % len(lora)]) for i, p in enumerate(batch)]))
    finally:
        engine.stop_loop()
    return {
        "machine": machine_info(),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": dtype,
        "adapters": len(lora),
        "one_adapter_rps": one,
        "mixed_rps": mixed,
        "ratio": statistics.median(m / o for m, o in zip(mixed, one, strict=True)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="the small bench model, one round")
    parser.add_argument("--out", type=Path, default=Path("build/bench"), help="directory (build/bench)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.gpu_check: torch sees no CUDA GPU", file=sys.stderr)
        return 2
    start = time.perf_counter()
    result = run(device, args.quick, args.out)
    one = ", ".join(f"{x:.1f}" for x in result["one_adapter_rps"])
    mixed = ", ".join(f"{x:.1f}" for x in result["mixed_rps"])
    print(f"# GPU check bench ({result['device']} {result['gpu'] or ''}, {result['dtype']})")
    print(f"1 adapter: {one} req/s; {result['adapters']} adapters mixed: {mixed} req/s")
    seconds = time.perf_counter() - start
    print(f"mixed / 1 adapter: {result['ratio']:.3f} (goal >= 0.95, issue 14) in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
