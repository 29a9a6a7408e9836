"""What the measurements are read against: field.md's bandwidth bound and a dispatch-cost model.

Bandwidth bound (field.md): a decode step with k distinct adapters over one costs
    T(B, k) / T(B, 1) ~= 1 + (k - 1) * dW / W
with W the elements of the adapted base matrices and dW = sum r * (in + out) for one adapter.

On a small CPU model each operator's fixed dispatch cost matters as much as the bytes it reads, so
`step_model` also prices the extra operators an adapter adds at the measured per-op cost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch.utils._python_dispatch import TorchDispatchMode

from .fixture import ModelSpec
from .machine import Calibration

FP32_BYTES = 4


@dataclass(frozen=True)
class LoraBound:
    """Sizes of the adapted weights, in elements."""

    w: int  # adapted base matrices, all layers
    dw: int  # one adapter's A and B matrices, all layers

    @classmethod
    def for_spec(cls, spec: ModelSpec) -> LoraBound:
        shapes = spec.adapted_shapes()
        return cls(
            w=sum(i * o for i, o in shapes),
            dw=sum(spec.rank * (i + o) for i, o in shapes),
        )

    @property
    def fraction(self) -> float:
        return self.dw / self.w

    def mixed_over_single(self, k: float) -> float:
        """T(B, k) / T(B, 1) in a bandwidth-bound decode step."""
        return 1 + (k - 1) * self.fraction

    def merged_over_unmerged(self, k: int) -> float:
        """How much slower one merged sub-batch per adapter (k * W bytes) is than unmerged, at best."""
        return k / self.mixed_over_single(k)


@dataclass(frozen=True)
class StepModel:
    """Predicted time of a variant of a decode step relative to a reference step."""

    extra_ops: int
    extra_calls: int
    extra_bytes: float
    extra_flops: float
    extra_ms: float
    predicted_ratio: float


def step_model(
    reference_ms: float,
    extra_ops: int,
    extra_bytes: float,
    extra_flops: float,
    extra_calls: int,
    machine: Calibration,
) -> StepModel:
    """T_variant ~= T_reference + ATen ops * per-op cost + module calls * call cost + bytes / bandwidth
    + FLOPs / matmul rate."""
    extra_s = (
        extra_ops * machine.per_op_us * 1e-6
        + extra_calls * machine.module_call_us * 1e-6
        + extra_bytes / (machine.gemv_gbps * 1e9)
        + extra_flops / (machine.matmul_gflops * 1e9)
    )
    return StepModel(
        extra_ops,
        extra_calls,
        extra_bytes,
        extra_flops,
        extra_s * 1e3,
        (reference_ms + extra_s * 1e3) / reference_ms,
    )


@dataclass(frozen=True)
class StepFloor:
    """A bare decode step against the least the machine needs for it: its ops, bytes and FLOPs."""

    batch: int
    measured_ms: float
    aten_ops: int
    mbytes: float
    mflops: float
    floor_ms: float

    @property
    def achieved(self) -> float:
        return self.floor_ms / self.measured_ms


def bare_step_floor(
    spec: ModelSpec, batch: int, cache_tokens: int, measured_ms: float, aten_ops: int, machine: Calibration
) -> StepFloor:
    """Every weight but the input embedding read once, the KV cache read once, 2 FLOPs per weight per row."""
    h, m, v = spec.hidden, spec.intermediate, spec.vocab
    weights = spec.layers * (4 * h * h + 3 * h * m + 2 * h) + h + v * h
    kv = 2 * spec.layers * batch * (cache_tokens + 1) * h
    nbytes = (weights + kv) * FP32_BYTES
    flops = 2 * batch * weights + 4 * batch * (cache_tokens + 1) * h * spec.layers
    floor_s = (
        aten_ops * machine.per_op_us * 1e-6
        + nbytes / (machine.gemv_gbps * 1e9)
        + flops / (machine.matmul_gflops * 1e9)
    )
    return StepFloor(batch, measured_ms, aten_ops, nbytes / 1e6, flops / 1e6, floor_s * 1e3)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def count_aten_ops(fn: Callable[[], object]) -> Counter[str]:
    """ATen operators one call of `fn` dispatches (views included), by name."""
    counter = _OpCounter()
    with counter:
        fn()
    return counter.ops
