"""The benchmark's output: one Markdown report (stdout and results.md) and the same data as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .bound import FP32_BYTES, LoraBound, StepFloor
from .fixture import LORA_TARGETS
from .machine import Calibration
from .measurements import BottleneckInfo, Check, Result
from .plans import Plan


@dataclass(frozen=True)
class Report:
    plan: Plan
    machine: dict[str, object]
    calibration: Calibration
    results: list[Result]
    checks: list[Check]
    floors: list[StepFloor]
    bottlenecks: list[BottleneckInfo]
    elapsed_s: float
    background_cores: float

    @property
    def sizes(self) -> LoraBound:
        return LoraBound.for_spec(self.plan.spec)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def _fmt_met(met: bool | None) -> str:
    return "—" if met is None else ("yes" if met else "**no**")


# Other processes busy on more than this many cores make a measurement suspect (flagged, not dropped).
NOISY_CORES = 0.25


def _fmt_load(cores: float) -> str:
    if math.isnan(cores):
        return "n/a"
    return f"{cores:.2f} ⚠" if cores > NOISY_CORES else f"{cores:.2f}"


def to_markdown(report: Report) -> str:
    plan, spec, m, cal, sizes = (
        report.plan,
        report.plan.spec,
        report.machine,
        report.calibration,
        report.sizes,
    )
    lines = [
        f"# Multi-adapter bench, LoRA and bottleneck adapters (plan: {plan.name})",
        "",
        f"Machine: {m['cpu_model']}, {m['usable_cores']} usable cores ({m['logical_cpus']} logical); "
        f"torch {m['torch']} with {m['torch_threads']} intra-op threads (pinned), "
        f"{m['torch_interop_threads']} inter-op; fp32; transformers {m['transformers']}, peft {m['peft']}, "
        f"Python {m['python']}. Load average at start: {m['loadavg_at_start']}; other processes kept "
        f"{m['background_cores_before']} cores busy just before the measurements and "
        f"{_fmt_load(report.background_cores)} on average during the run.",
        "",
        f"Model: random Llama, {spec.layers} layers, hidden {spec.hidden}, {spec.heads} heads, intermediate "
        f"{spec.intermediate}, vocab {spec.vocab}; {spec.n_adapters} PEFT LoRA adapters, r={spec.rank}, "
        f"lora_alpha={spec.lora_alpha}, targets {', '.join(LORA_TARGETS)}; AdapterHub bottleneck adapters "
        f"in the same bank, default reduction_factor: {'; '.join(str(b) for b in report.bottlenecks)}. "
        f"Run time {report.elapsed_s:.0f} s.",
        "",
        *(
            ["**Smoke run on a tiny model: these numbers say nothing about performance.**", ""]
            if report.plan.name != "full"
            else []
        ),
        "## Ratios",
        "",
        "Each ratio is the median over trials of two times measured in the same trial (order alternating "
        "A B / B A); IQR = quartiles of the per-trial ratios. Absolute times are medians, for context only. "
        "Anchor: the comparable published figure from field.md as the same ratio (other models and "
        "hardware, GPUs mostly).",
        "",
        "| measurement | ratio | IQR | goal | met? | anchor | absolute (context) | trials "
        "| other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        lines.append(
            f"| {r.title} | {r.ratio.median:.3f} | {r.ratio.q1:.3f}–{r.ratio.q3:.3f} | "
            f"{r.goal or '—'} | {_fmt_met(r.met)} | {r.anchor or '—'} | {r.context} | {r.rounds} | "
            f"{_fmt_load(r.background_cores)} |"
        )
    if any(r.background_cores > NOISY_CORES for r in report.results):
        lines += [
            "",
            f"⚠ Other processes kept more than {NOISY_CORES} cores busy during this measurement: the "
            "machine was shared. Per-trial ratios cancel slow drift but not bursts; rerun on a quiet "
            "machine to confirm.",
        ]
    w_mb, dw_mb = sizes.w * FP32_BYTES / 1e6, sizes.dw * FP32_BYTES / 1e6
    lines += [
        "",
        "## Achieved vs bound",
        "",
        f"Adapted base matrices W = {sizes.w / 1e6:.2f} M elements ({w_mb:.1f} MB fp32); one adapter "
        f"ΔW = Σ r·(in+out) = {sizes.dw / 1e6:.3f} M ({dw_mb:.2f} MB); ΔW/W = {sizes.fraction:.4f}. "
        f"Bandwidth bound for k={plan.batch}: T(B,k)/T(B,1) ≈ 1 + (k−1)·ΔW/W = "
        f"{sizes.mixed_over_single(plan.batch):.3f}; a merged path (one sub-batch per adapter) would be at "
        f"least {sizes.merged_over_unmerged(plan.batch):.2f}× slower than unmerged. The model column prices "
        "what the variant adds (ATen ops counted in one step, wrapper module calls, bytes, FLOPs) at the "
        "machine figures below.",
        "",
        "| measurement | measured | bandwidth bound | dispatch + bandwidth model | measured / model "
        "| model inputs |",
        "|---|---|---|---|---|---|",
    ]
    for r in report.results:
        if r.model is None:
            continue
        bound = "—" if r.bound is None else f"{r.bound:.3f}"
        lines.append(
            f"| {r.title} | {r.ratio.median:.3f} | {bound} | {r.model:.3f} | "
            f"{r.ratio.median / r.model:.3f} | {r.model_detail} |"
        )
    lines += [
        "",
        "| bare HF decode step | measured | floor (ops·per-op + bytes/BW + FLOPs/peak) | floor / measured "
        "| inputs |",
        "|---|---|---|---|---|",
    ]
    for f in report.floors:
        lines.append(
            f"| B={f.batch}, {plan.cache_tokens}-token cache | {f.measured_ms:.2f} ms "
            f"| {f.floor_ms:.2f} ms | "
            f"{f.achieved:.2f} | {f.aten_ops} ATen ops, {f.mbytes:.1f} MB, {f.mflops:.1f} MFLOP |"
        )
    lines += [
        "",
        "## Machine figures",
        "",
        "| figure | value |",
        "|---|---|",
        f"| per-op overhead: one tiny matmul [1,8]@[8,8] | {cal.per_op_us:.2f} µs |",
        f"| nn.Module call returning its input | {cal.module_call_us:.2f} µs |",
        f"| fp32 matmul {cal.matmul_n}×{cal.matmul_n}×{cal.matmul_n} | {cal.matmul_gflops:.1f} GFLOP/s |",
        f"| fp32 matrix-vector product over {cal.gemv_mbytes:.0f} MB of weights | {cal.gemv_gbps:.1f} GB/s |",
        "",
        "## Checks",
        "",
    ]
    lines += [f"- [{'x' if c.ok else ' '}] {c.name}: {c.detail}" for c in report.checks]
    lines += ["", "## How each number was measured", ""]
    seen = set()
    for r in report.results:
        if r.method not in seen:
            seen.add(r.method)
            lines.append(f"- {r.title}: {r.method}")
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, object]:
    return {
        "plan": dataclasses.asdict(report.plan),
        "machine": report.machine,
        "calibration": report.calibration.as_dict(),
        "bound": {
            "w_elements": report.sizes.w,
            "dw_elements": report.sizes.dw,
            "dw_over_w": report.sizes.fraction,
            "k": report.plan.batch,
            "mixed_over_single": report.sizes.mixed_over_single(report.plan.batch),
            "merged_over_unmerged": report.sizes.merged_over_unmerged(report.plan.batch),
        },
        "results": [
            {
                **dataclasses.asdict(r),
                "goal": None if r.goal is None else dataclasses.asdict(r.goal),
                "met": r.met,
            }
            for r in report.results
        ],
        "floors": [{**dataclasses.asdict(f), "achieved": f.achieved} for f in report.floors],
        "bottlenecks": [dataclasses.asdict(b) for b in report.bottlenecks],
        "checks": [dataclasses.asdict(c) for c in report.checks],
        "elapsed_s": report.elapsed_s,
        "background_cores": report.background_cores,
        "ok": report.ok,
    }


def write(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """Write results.md and results.json under `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "results.md", out_dir / "results.json"
    md.write_text(to_markdown(report))
    # NaN (no /proc) is not valid JSON; write null instead.
    js.write_text(json.dumps(_no_nan(to_json(report)), indent=2) + "\n")
    return md, js


def _no_nan(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_no_nan(v) for v in value]
    return value
