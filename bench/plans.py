"""Named benchmark plans: the model, the workload sizes and the time box of each measurement."""

from __future__ import annotations

from dataclasses import dataclass

from .fixture import BENCH_SPEC, QUICK_SPEC, ModelSpec
from .timing import Budget


@dataclass(frozen=True)
class Plan:
    """One benchmark run. `batch` rows use `batch` distinct LoRA adapters in the mixed case; the kinds
    batch puts one row on each bottleneck preset, one on the base and the rest on LoRA adapters. The wide
    batch has `wide_batch` rows over the same `batch` adapters (several rows per adapter)."""

    name: str
    spec: ModelSpec
    batch: int
    wide_batch: int
    prompt_tokens: int
    new_tokens: int
    cache_tokens: int
    generation: Budget
    decode: Budget
    smoke: bool = False  # shrink the machine figures and micro-timings as well
    seed: int = 0

    def __post_init__(self):
        if self.batch > self.spec.n_adapters:
            raise ValueError(
                f"batch {self.batch} needs {self.batch} adapters, the spec has {self.spec.n_adapters}"
            )
        if self.wide_batch < 2 * self.batch:
            raise ValueError(f"wide_batch {self.wide_batch} must give each of {self.batch} adapters 2+ rows")
        if self.batch < len(self.spec.bottleneck_kinds) + 2:
            raise ValueError(
                f"batch {self.batch} cannot mix {len(self.spec.bottleneck_kinds)} bottleneck rows, "
                "a base row and LoRA rows"
            )
        if self.prompt_tokens + self.new_tokens > self.spec.max_positions:
            raise ValueError("prompt_tokens + new_tokens exceed the model's context window")
        if self.cache_tokens + 1 > self.spec.max_positions:
            raise ValueError("cache_tokens exceed the model's context window")


# Full: about 4 min on 2 quiet cores (generation 120 s, each decode size 50 s), at most ~7.5 on a busy box.
FULL = Plan(
    name="full",
    spec=BENCH_SPEC,
    batch=8,
    wide_batch=32,
    prompt_tokens=32,
    new_tokens=32,
    cache_tokens=64,
    generation=Budget(warmup=2, min_rounds=15, max_rounds=400, seconds=120.0),
    decode=Budget(warmup=10, min_rounds=50, max_rounds=2000, seconds=50.0),
)

# Quick: a smoke run of every code path in seconds; its numbers mean nothing. B=8 as in FULL, so the
# kinds batch has the same 4 LoRA + 3 bottleneck + 1 base rows.
QUICK = Plan(
    name="quick",
    spec=QUICK_SPEC,
    batch=8,
    wide_batch=16,
    prompt_tokens=8,
    new_tokens=4,
    cache_tokens=16,
    generation=Budget(warmup=1, min_rounds=3, max_rounds=5, seconds=1.0),
    decode=Budget(warmup=1, min_rounds=3, max_rounds=10, seconds=1.0),
    smoke=True,
)

PLANS = {plan.name: plan for plan in (FULL, QUICK)}
