"""Command line: build the bench model, calibrate the machine, run every measurement, write the report."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine
from transformers import AutoModelForCausalLM

from . import report as report_mod
from .fixture import build_fixture
from .machine import CpuMonitor, calibrate, machine_info, usable_cores
from .measurements import decode_step, describe_bottlenecks, mixed_generation
from .plans import FULL, QUICK
from .timing import Progress


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Multi-adapter benchmark (LoRA and bottleneck adapters): ratios measured side by side, "
        "on CPU, fp32.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny model, few trials: a smoke run (<1 min)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for results.md, results.json and the model "
        "(default: build/bench, or build/bench/quick with --quick)",
    )
    parser.add_argument(
        "--threads", type=int, default=usable_cores(), help="torch intra-op threads (default: usable cores)"
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.out is None:
        args.out = Path("build/bench/quick" if args.quick else "build/bench")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    # Pinned before any parallel work: the inter-op pool cannot be resized once used.
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    progress = Progress()
    start = time.perf_counter()
    monitor = CpuMonitor()
    machine = machine_info()

    progress.section(f"plan {plan.name}: {args.threads} threads, model under {args.out}")
    fixture, built = build_fixture(plan.spec, args.out / f"model-{plan.name}")
    progress.section(f"{'built' if built else 'reused'} model and adapters in {fixture.base_model.parent}")

    engine = Engine.load(
        EngineConfig(
            base_model=fixture.base_model,
            adapter_dir=fixture.adapter_dir,
            dtype="float32",
            max_adapters=plan.spec.bank_size,
            queue_timeout_ms=0,  # a slow machine measures slowly; it never fails requests
        )
    )
    if engine.refused or len(engine.bank) != plan.spec.bank_size:
        print(f"error: the engine did not load every adapter: {engine.refused}", file=sys.stderr)
        return 1
    bottlenecks = describe_bottlenecks(engine, fixture.adapter_dir, plan.spec)
    bare = AutoModelForCausalLM.from_pretrained(
        fixture.base_model, dtype=torch.float32, local_files_only=True, use_safetensors=True
    ).eval()
    bare.requires_grad_(False)

    idle_probe = CpuMonitor()
    time.sleep(0.2 if plan.smoke else 2.0)
    machine["background_cores_before"] = round(idle_probe.background_cores(), 2)
    if machine["background_cores_before"] > 0.5:
        progress.section(
            f"warning: other processes keep {machine['background_cores_before']} cores busy; timings with "
            f"{args.threads} threads on {machine['usable_cores']} cores will be noisy"
            + (" (OpenMP threads stall when preempted: consider --threads 1)" if args.threads > 1 else "")
        )

    progress.section("machine figures: per-op overhead, matmul GFLOP/s, streaming bandwidth")
    calibration = calibrate(smoke=plan.smoke)

    results, checks, floors = [], [], []
    section_results, section_checks = mixed_generation(engine, plan, progress)
    results += section_results
    checks += section_checks
    for batch in sorted({1, plan.batch}):
        section_results, section_checks, floor = decode_step(
            engine, bare, plan, batch, bottlenecks, calibration, progress
        )
        results += section_results
        checks += section_checks
        floors.append(floor)

    report = report_mod.Report(
        plan=plan,
        machine=machine,
        calibration=calibration,
        results=results,
        checks=checks,
        floors=floors,
        bottlenecks=bottlenecks,
        elapsed_s=time.perf_counter() - start,
        background_cores=monitor.background_cores(),
    )
    md_path, json_path = report_mod.write(report, args.out)
    sys.stdout.write(report_mod.to_markdown(report))
    progress.section(f"wrote {md_path} and {json_path}")
    if not report.ok:
        failed = [c.name for c in report.checks if not c.ok]
        print(f"error: checks failed, the numbers above are not valid: {failed}", file=sys.stderr)
        return 1
    return 0
