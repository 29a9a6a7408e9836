"""The measurements: mixed-adapter generation throughput and the cost of one decode step.

Each function times its variants side by side (`timing.interleave`) and returns `Result` rows plus
`Check`s that make sure the timed code really did what the row claims (adapters change the output,
the base route is exactly the bare model, every row generated its full token budget). LoRA and
bottleneck adapters sit in one bank; both kinds are timed in the same trials.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from multiadapter.bank import BASE_SLOT
from multiadapter.bottleneck_config import BottleneckSpec
from multiadapter.bottleneck_loading import CONFIG_FILE as BOTTLENECK_CONFIG_FILE
from multiadapter.engine import Engine
from multiadapter.generation import RowRequest, generate_rows
from multiadapter.layers import BankedLinear, lora_delta
from multiadapter.sampling import SamplingParams
from torch import nn

from .bound import FP32_BYTES, LoraBound, StepFloor, bare_step_floor, count_aten_ops, step_model
from .fixture import ModelSpec
from .machine import Calibration, per_call_seconds
from .plans import Plan
from .timing import Progress, RatioStat, Samples, Workload, interleave, paired_ratio

# Below this, an adapter's effect on the logits would be indistinguishable from no adapter at all.
MIN_ADAPTER_EFFECT = 1e-3
# Batch composition may change float summation order; anything above this is a real difference.
BATCH_INVARIANCE_TOL = 1e-4
ALL_ROWS = slice(None)
# The LoRA paper's Table 1 (GPT-2 medium, batch 1, per-token latency of bottleneck adapters over none).
BOTTLENECK_ANCHOR = "1.21 / 1.30 (LoRA paper, B=1, GPT-2 M); AdapterDrop 1.04–1.06"


@dataclass(frozen=True)
class Goal:
    op: str  # ">=" or "<="
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{'≥' if self.op == '>=' else '≤'} {self.value:.2f}"


@dataclass(frozen=True)
class Result:
    """One ratio, measured side by side. `bound` / `model` are predictions where one applies."""

    key: str
    title: str
    ratio: RatioStat
    goal: Goal | None
    medians_ms: dict[str, float]
    context: str
    rounds: int
    background_cores: float
    method: str
    bound: float | None = None
    model: float | None = None
    model_detail: str = ""
    anchor: str = ""  # the comparable published figure from field.md, as the same ratio

    @property
    def met(self) -> bool | None:
        return None if self.goal is None else self.goal.met(self.ratio.median)


@dataclass(frozen=True)
class Check:
    """A precondition of a measurement; a failed one invalidates the numbers."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class BottleneckInfo:
    """A resident bottleneck adapter: its preset, bank slot, width (layer 0), places and device bytes."""

    adapter_id: str
    slot: int
    width: int
    places: int
    nbytes: int

    def __str__(self) -> str:
        return f"{self.adapter_id} (width {self.width}, {self.places} places, {self.nbytes / 1e6:.2f} MB)"


def describe_bottlenecks(engine: Engine, adapter_dir: Path, spec: ModelSpec) -> list[BottleneckInfo]:
    """The bench's bottleneck adapters as the engine holds them, their width read by the core's parser."""
    infos = []
    for kind in spec.bottleneck_kinds:
        entry = engine.resolve(kind)
        config = json.loads((adapter_dir / kind / BOTTLENECK_CONFIG_FILE).read_text())
        width = BottleneckSpec.from_dict(kind, config).bottleneck_size(0, spec.hidden)
        infos.append(BottleneckInfo(kind, entry.slot, int(width or 0), len(entry.places), entry.nbytes))
    return infos


def lora_slots(engine: Engine, spec: ModelSpec, count: int) -> list[int]:
    """Bank slots of the first `count` LoRA adapters (a0, a1, ...)."""
    return [engine.resolve(adapter_id).slot for adapter_id in spec.adapter_ids()[:count]]


def kinds_batch(engine: Engine, plan: Plan) -> tuple[list[int], int]:
    """Slots of a batch mixing every kind: LoRA a0, a1, ... then one row per bottleneck preset, then one
    base row (B=8 with three presets: 4 LoRA + 3 bottleneck + 1 base). Also returns the LoRA row count."""
    bottleneck = [engine.resolve(kind).slot for kind in plan.spec.bottleneck_kinds]
    n_lora = plan.batch - len(bottleneck) - 1
    return [*lora_slots(engine, plan.spec, n_lora), *bottleneck, BASE_SLOT], n_lora


def _prompts(plan: Plan, rows: int, length: int, salt: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(plan.seed * 7919 + salt)
    # Ids 0..2 are pad / bos / eos in the bench model; prompts avoid them.
    return torch.randint(3, plan.spec.vocab, (rows, length), generator=gen)


def mixed_generation(engine: Engine, plan: Plan, progress: Progress) -> tuple[list[Result], list[Check]]:
    """(a) One batched greedy generation: `batch` distinct LoRA adapters, LoRA + bottleneck + base rows,
    all rows on one adapter, all rows on the base."""
    slots = lora_slots(engine, plan.spec, plan.batch)
    kinds, n_lora = kinds_batch(engine, plan)
    prompts = _prompts(plan, plan.wide_batch, plan.prompt_tokens, salt=1).tolist()
    params = SamplingParams(max_tokens=plan.new_tokens)
    wide = plan.wide_batch
    variants = {
        "mixed": slots,
        "uniform": [slots[0]] * plan.batch,
        "base": [BASE_SLOT] * plan.batch,
        "kinds": kinds,
        "mixed_wide": [slots[i % plan.batch] for i in range(wide)],
        "uniform_wide": [slots[0]] * wide,
    }
    requests = {
        name: [RowRequest(p, s, params, plan.new_tokens) for p, s in zip(prompts, row_slots, strict=False)]
        for name, row_slots in variants.items()
    }
    progress.section(
        f"(a) generation: {plan.batch} rows x {plan.prompt_tokens}-token prompts "
        f"+ {plan.new_tokens} new tokens"
    )
    with torch.inference_mode(), engine.bank.routing(variants["mixed"]) as routing:

        def run(name: str):
            # No EOS ids: every row generates exactly new_tokens, whatever the random model predicts.
            return lambda: generate_rows(
                engine.model,
                routing,
                requests[name],
                eos_ids=frozenset(),
                pad_id=engine.pad_id,
                device=engine.device,
            )

        outputs = {name: [o.token_ids for o in run(name)()] for name in variants}
        samples = interleave(
            [Workload(name, run(name)) for name in variants], plan.generation, progress, "(a)"
        )

    # Row 0 uses adapter a0 in both batches; every other row uses a different adapter in the mixed one.
    changed = sum(m != u for m, u in zip(outputs["mixed"][1:], outputs["uniform"][1:], strict=True))
    # The kinds batch shares its LoRA rows with the mixed batch and its last row with the base batch.
    bn_rows = range(n_lora, plan.batch - 1)
    bn_changed = sum(outputs["kinds"][i] != outputs["base"][i] for i in bn_rows)
    checks = [
        Check(
            "(a) every row generated its full budget",
            all(len(t) == plan.new_tokens for out in outputs.values() for t in out),
            f"{plan.new_tokens} tokens per row expected",
        ),
        Check(
            "(a) distinct adapters change the generated tokens",
            changed > 0,
            f"{changed} of the {plan.batch - 1} rows on another adapter differ from the one-adapter batch",
        ),
        Check(
            "(a) row 0 (same adapter in both batches) is batch-invariant",
            outputs["mixed"][0] == outputs["uniform"][0],
            "identical greedy tokens expected",
        ),
        Check(
            "(a) LoRA and base rows of the kinds batch are batch-invariant",
            outputs["kinds"][:n_lora] == outputs["mixed"][:n_lora]
            and outputs["kinds"][-1] == outputs["base"][-1],
            f"rows 0..{n_lora - 1} equal the distinct-LoRA batch, row {plan.batch - 1} the base batch",
        ),
        Check(
            "(a) rows grouped by adapter in the wide batch are batch-invariant",
            outputs["mixed_wide"][: plan.batch] == outputs["mixed"]
            and outputs["uniform_wide"][: plan.batch] == outputs["uniform"],
            f"the wide batches' first {plan.batch} rows equal the mixed and one-adapter batches",
        ),
        Check(
            "(a) bottleneck rows of the kinds batch change the generated tokens",
            bn_changed > 0,
            f"{bn_changed} of the {len(bn_rows)} bottleneck rows differ from the same prompts on the base",
        ),
    ]

    def tok_s(name: str) -> str:
        tokens = len(variants[name]) * plan.new_tokens
        return f"{name} {samples.median_ms(name):.0f} ms ({tokens / samples.median_ms(name) * 1e3:.0f} tok/s)"

    common = dict(
        rounds=samples.rounds, background_cores=samples.background_cores, medians_ms=_medians(samples)
    )

    def versus(variant: str, reference: str) -> dict:
        """A result's ratio (reference time over variant time, per trial) and its context: both times."""
        return dict(
            ratio=paired_ratio(samples, reference, variant), context=f"{tok_s(variant)}; {tok_s(reference)}"
        )

    results = [
        Result(
            key="a.mixed",
            title=f"(a) throughput, {plan.batch} distinct LoRA adapters / 1 adapter (B={plan.batch})",
            **versus("mixed", "uniform"),
            goal=Goal(">=", 0.90),
            anchor="1.01 (Punica, B=32, A100)",
            method=(
                f"Per trial, time of generate_rows for {plan.batch} rows all on adapter a0 divided by "
                f"the time for the same prompts on {plan.batch} distinct adapters (prefill + "
                f"{plan.new_tokens - 1} decode forwards + greedy selection), EOS disabled."
            ),
            **common,
        ),
        Result(
            key="a.mixed_wide",
            title=(
                f"(a) throughput, {wide} rows on {plan.batch} adapters ({wide // plan.batch} each) "
                f"/ {wide} rows on 1 adapter (B={wide})"
            ),
            **versus("mixed_wide", "uniform_wide"),
            goal=Goal(">=", 0.90),
            anchor="1.01 (Punica, B=32, A100)",
            method=(
                f"Same trials, {wide} rows (the first {plan.batch} prompts of the mixed batch and more): "
                f"rows cycle over adapters a0..a{plan.batch - 1}, so each adapter's rows are computed as one "
                "group that reads its weights once per layer, against all rows on adapter a0."
            ),
            **common,
        ),
        Result(
            key="a.lora_vs_base",
            title=f"(a) throughput, 1 adapter / base rows (B={plan.batch})",
            **versus("uniform", "base"),
            goal=None,
            method="Same trials: base-row time over one-adapter time (Punica reports 0.92 on a GPU).",
            anchor="0.92 / 0.88 (Punica, 7B / 13B)",
            **common,
        ),
        Result(
            key="a.kinds",
            title=(
                f"(a) throughput, {n_lora} LoRA + {len(plan.spec.bottleneck_kinds)} bottleneck + 1 base "
                f"rows / 1 adapter (B={plan.batch})"
            ),
            **versus("kinds", "uniform"),
            goal=Goal(">=", 0.90),
            anchor="none: no system mixes kinds",
            method=(
                f"Same trials: the one-adapter time over the time of a batch with rows 0..{n_lora - 1} on "
                f"LoRA adapters a0..a{n_lora - 1}, one row on each bottleneck preset "
                f"({', '.join(plan.spec.bottleneck_kinds)}) and the last row on the base, same prompts."
            ),
            **common,
        ),
    ]
    return results, checks


@dataclass
class _DecodeVariant:
    name: str
    model: nn.Module
    slots: list[int] | None  # None: the bare model, no routing
    cache: object = None


def decode_step(
    engine: Engine,
    bare: nn.Module,
    plan: Plan,
    batch: int,
    bottlenecks: list[BottleneckInfo],
    machine: Calibration,
    progress: Progress,
) -> tuple[list[Result], list[Check], StepFloor]:
    """(b) One decode forward (one new token per row over a KV cache) through the engine vs bare HF:
    base rows, one LoRA adapter, k distinct LoRA adapters, and one bottleneck adapter of each preset."""
    slots = lora_slots(engine, plan.spec, batch)
    variants = [
        _DecodeVariant("bare", bare, None),
        _DecodeVariant("engine_base", engine.model, [BASE_SLOT] * batch),
        _DecodeVariant("adapter", engine.model, [slots[0]] * batch),
    ]
    if batch > 1:
        variants.append(_DecodeVariant("mixed", engine.model, slots))
    variants += [_DecodeVariant(bn.adapter_id, engine.model, [bn.slot] * batch) for bn in bottlenecks]
    n_cache = plan.cache_tokens
    context_ids = _prompts(plan, batch, n_cache, salt=2 + batch)
    step_ids = _prompts(plan, batch, 1, salt=100 + batch)
    step_mask = torch.ones(batch, n_cache + 1, dtype=torch.long)
    step_pos = torch.full((batch, 1), n_cache, dtype=torch.long)
    progress.section(f"(b) decode step: batch {batch}, KV cache {n_cache} tokens, one new token")

    with torch.inference_mode(), engine.bank.routing([BASE_SLOT] * batch) as routing:

        def prepare(v: _DecodeVariant):
            return (lambda: None) if v.slots is None else (lambda: routing.set_slots(v.slots))

        def step(v: _DecodeVariant):
            return lambda: v.model(
                input_ids=step_ids,
                attention_mask=step_mask,
                position_ids=step_pos,
                past_key_values=v.cache,
                use_cache=True,
            ).logits

        def rewind(v: _DecodeVariant):
            return lambda: v.cache.crop(n_cache)

        for v in variants:
            prepare(v)()
            v.cache = v.model(
                input_ids=context_ids, attention_mask=torch.ones_like(context_ids), use_cache=True
            ).past_key_values
        logits, ops = {}, {}
        for v in variants:
            prepare(v)()
            logits[v.name] = step(v)()
            rewind(v)()
            ops[v.name] = sum(count_aten_ops(step(v)).values())
            rewind(v)()
        workloads = [Workload(v.name, step(v), prepare(v), rewind(v)) for v in variants]
        samples = interleave(workloads, plan.decode, progress, f"(b) B={batch}")
        cache_ok = all(v.cache.get_seq_length() == n_cache for v in variants)

        isolated = {
            "adapter": isolated_deltas_ms(plan.spec, batch, distinct=False, smoke=plan.smoke),
            "mixed": isolated_deltas_ms(plan.spec, batch, distinct=True, smoke=plan.smoke),
        }

    checks = _decode_checks(batch, logits, cache_ok, bottlenecks)
    floor = bare_step_floor(plan.spec, batch, n_cache, samples.median_ms("bare"), ops["bare"], machine)
    results = _decode_results(engine, plan, batch, bottlenecks, machine, samples, ops, isolated)
    return results, checks, floor


def isolated_deltas_ms(spec: ModelSpec, batch: int, distinct: bool, smoke: bool) -> float:
    """Every adapted layer's `y + lora_delta(x, a_t, b_t)` for one new token per row, timed alone and summed.

    distinct: one adapter per row (a_t [B, in, r], as the engine gathers them) or one shared (a_t [in, r]).
    """
    gen = torch.Generator().manual_seed(0)
    r, total = spec.rank, 0.0
    for (n_in, n_out), count in Counter(spec.adapted_shapes()).items():
        x, y = torch.randn(batch, 1, n_in, generator=gen), torch.randn(batch, 1, n_out, generator=gen)
        lead = (batch,) if distinct else ()
        a_t, b_t = torch.randn(*lead, n_in, r, generator=gen), torch.randn(*lead, r, n_out, generator=gen)

        def delta(x=x, y=y, a_t=a_t, b_t=b_t):
            return y + lora_delta(x, a_t, b_t)

        total += count * per_call_seconds(delta, calls=20 if smoke else 200, repeats=3 if smoke else 15)
    return total * 1e3


def _decode_checks(
    batch: int, logits: dict[str, torch.Tensor], cache_ok: bool, bottlenecks: list[BottleneckInfo]
) -> list[Check]:
    def diff(a: str, b: str, row: slice = ALL_ROWS) -> float:
        return float((logits[a][row] - logits[b][row]).abs().max())

    checks = [
        Check(f"(b) B={batch} KV cache rewound after every step", cache_ok, "length back to the prefill"),
        Check(
            f"(b) B={batch} base rows through the engine equal the bare model",
            diff("engine_base", "bare") <= BATCH_INVARIANCE_TOL,
            f"max |logit diff| {diff('engine_base', 'bare'):.2e}",
        ),
        Check(
            f"(b) B={batch} the adapter changes the logits",
            diff("adapter", "bare") > MIN_ADAPTER_EFFECT,
            f"max |logit diff| {diff('adapter', 'bare'):.2e}",
        ),
    ]
    if "mixed" in logits:
        checks += [
            Check(
                f"(b) B={batch} row 0 of the mixed batch equals the one-adapter batch",
                diff("mixed", "adapter", slice(0, 1)) <= BATCH_INVARIANCE_TOL,
                f"max |logit diff| {diff('mixed', 'adapter', slice(0, 1)):.2e}",
            ),
            Check(
                f"(b) B={batch} the other rows of the mixed batch differ",
                diff("mixed", "adapter", slice(1, None)) > MIN_ADAPTER_EFFECT,
                f"max |logit diff| {diff('mixed', 'adapter', slice(1, None)):.2e}",
            ),
        ]
    checks += [
        Check(
            f"(b) B={batch} the {bn.adapter_id} bottleneck adapter changes the logits",
            diff(bn.adapter_id, "bare") > MIN_ADAPTER_EFFECT,
            f"max |logit diff| {diff(bn.adapter_id, 'bare'):.2e}",
        )
        for bn in bottlenecks
    ]
    return checks


def _decode_results(
    engine: Engine,
    plan: Plan,
    batch: int,
    bottlenecks: list[BottleneckInfo],
    machine: Calibration,
    samples: Samples,
    ops: dict[str, int],
    isolated: dict[str, float],
) -> list[Result]:
    sizes = LoraBound.for_spec(plan.spec)
    # Every engine forward calls each LoRA wrapper and both hooks of each bottleneck place, routed or not.
    places = {place for entry in engine.bank.entries() for place in entry.places}
    wrapped = sum(isinstance(m, BankedLinear) for m in engine.model.modules()) + 2 * len(places)
    ms = _medians(samples)
    common = dict(rounds=samples.rounds, background_cores=samples.background_cores, medians_ms=ms)
    where = f"B={batch}, {plan.cache_tokens}-token KV cache"

    def model(
        reference: str,
        variant: str,
        extra_bytes: float,
        extra_flops: float,
        calls: int,
        alone_ms: float | None,
    ):
        m = step_model(ms[reference], ops[variant] - ops[reference], extra_bytes, extra_flops, calls, machine)
        detail = (
            f"{m.extra_ops:+d} ATen ops, {calls} module / hook calls, {m.extra_bytes / 1e6:.1f} MB, "
            f"{m.extra_flops / 1e6:.1f} MFLOP -> {m.extra_ms:+.2f} ms modelled"
        )
        if alone_ms is not None:
            detail += f"; the deltas timed alone {alone_ms:+.2f} ms"
        detail += f"; measured {ms[variant] - ms[reference]:+.2f} ms"
        return m.predicted_ratio, detail

    adapter_model, adapter_detail = model(
        "bare", "adapter", sizes.dw * FP32_BYTES, 2 * batch * sizes.dw, wrapped, isolated["adapter"]
    )
    wrapper_model, wrapper_detail = model("bare", "engine_base", 0.0, 0.0, wrapped, None)
    results = [
        Result(
            key=f"b.adapter.B{batch}",
            title=f"(b) decode step, 1 unmerged LoRA adapter / bare HF base ({where})",
            ratio=paired_ratio(samples, "adapter", "bare"),
            goal=Goal("<=", 1.15),
            context=f"adapter {ms['adapter']:.2f} ms; bare {ms['bare']:.2f} ms",
            method=(
                "Per trial, one forward of one new token per row over a prefilled KV cache (cropped back "
                "after each step, untimed) through the engine with every row on adapter a0, over the same "
                "step in a plain HF model loaded from the same directory."
            ),
            model=adapter_model,
            model_detail=adapter_detail,
            anchor="1.09 / 1.14 (Punica 7B / 13B); 1.51 (vLLM V0)",
            **common,
        ),
        Result(
            key=f"b.wrapper.B{batch}",
            title=f"(b) decode step, base rows via engine / bare HF base ({where})",
            ratio=paired_ratio(samples, "engine_base", "bare"),
            goal=None,
            context=f"engine base {ms['engine_base']:.2f} ms; bare {ms['bare']:.2f} ms",
            method=(
                "Same trials, every row routed to the base (adapter_id ''): the cost of the LoRA wrappers "
                "and the bottleneck hooks themselves."
            ),
            model=wrapper_model,
            model_detail=wrapper_detail,
            **common,
        ),
    ]
    for bn in bottlenecks:
        bn_model, bn_detail = model(
            "bare", bn.adapter_id, bn.nbytes, 2 * batch * bn.nbytes / FP32_BYTES, wrapped, None
        )
        results.append(
            Result(
                key=f"b.bottleneck.{bn.adapter_id}.B{batch}",
                title=f"(b) decode step, 1 {bn.adapter_id} bottleneck adapter / bare HF base ({where})",
                ratio=paired_ratio(samples, bn.adapter_id, "bare"),
                goal=Goal("<=", 1.15),
                anchor=BOTTLENECK_ANCHOR,
                context=f"{bn.adapter_id} {ms[bn.adapter_id]:.2f} ms; bare {ms['bare']:.2f} ms",
                method=(
                    "Same trials, every row on one AdapterHub bottleneck adapter (a preset with its default "
                    "reduction_factor, random weights, applied by the engine's hooks at the residual adds) "
                    "over the bare HF step: " + "; ".join(str(b) for b in bottlenecks) + "."
                ),
                model=bn_model,
                model_detail=bn_detail,
                **common,
            )
        )
    if "mixed" in ms:
        k = batch
        mixed_model, mixed_detail = model(
            "adapter",
            "mixed",
            (k - 1) * sizes.dw * FP32_BYTES,
            0.0,
            0,
            isolated["mixed"] - isolated["adapter"],
        )
        results.append(
            Result(
                key=f"c.mixed.B{batch}",
                title=f"(c) decode step, {k} distinct LoRA adapters / 1 adapter ({where})",
                ratio=paired_ratio(samples, "mixed", "adapter"),
                goal=None,
                context=f"mixed {ms['mixed']:.2f} ms; 1 adapter {ms['adapter']:.2f} ms",
                method="Same trials: T(B,k)/T(B,1), to read against the bandwidth bound 1 + (k-1)·ΔW/W.",
                bound=sizes.mixed_over_single(k),
                model=mixed_model,
                model_detail=mixed_detail,
                **common,
            )
        )
    return results


def _medians(samples: Samples) -> dict[str, float]:
    return {name: samples.median_ms(name) for name in samples.seconds}
