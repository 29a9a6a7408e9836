"""What the machine is and what it can do: identity, background load, per-op cost, FLOP/s, bandwidth."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .host import cpu_model, usable_cores


def machine_info() -> dict[str, object]:
    """Identity of the machine and the software stack; call after the thread count is pinned."""
    import peft
    import transformers

    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "loadavg_at_start": _loadavg(),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuMonitor:
    """CPU time other processes used since construction, from /proc (Linux); None elsewhere.

    The box may be shared: a result measured while another process held a core is worth less, so each
    measurement reports how many cores were busy with something else.
    """

    def __init__(self):
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._t0 = time.monotonic()
        self._busy0 = self._system_busy()
        self._own0 = self._own_ticks()

    @staticmethod
    def _system_busy() -> int | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle  # user..steal; guest time is already inside user

    @staticmethod
    def _own_ticks() -> int | None:
        try:
            stat = Path("/proc/self/stat").read_text()
        except OSError:
            return None
        fields = stat.rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, all threads

    def background_cores(self) -> float:
        busy, own = self._system_busy(), self._own_ticks()
        if None in (busy, own, self._busy0, self._own0):
            return float("nan")
        elapsed = time.monotonic() - self._t0
        other = (busy - self._busy0) - (own - self._own0)
        return max(0.0, other / self._hz / max(elapsed, 1e-9))


@dataclass(frozen=True)
class Calibration:
    """Machine figures the bound is read against."""

    per_op_us: float  # one tiny matmul ([1, 8] @ [8, 8]): framework dispatch, no arithmetic to speak of
    module_call_us: float  # calling an nn.Module whose forward returns its input (Python-side cost)
    matmul_gflops: float  # square fp32 matmul
    matmul_n: int
    gemv_gbps: float  # weight bytes / time of a matrix-vector product over a matrix far larger than cache
    gemv_mbytes: float

    def as_dict(self) -> dict[str, float]:
        return {
            "per_op_us": self.per_op_us,
            "module_call_us": self.module_call_us,
            "matmul_gflops": self.matmul_gflops,
            "matmul_n": self.matmul_n,
            "gemv_gbps": self.gemv_gbps,
            "gemv_mbytes": self.gemv_mbytes,
        }


def calibrate(smoke: bool) -> Calibration:
    """Measure per-op overhead, matmul FLOP/s and streaming bandwidth (medians of repeats), fp32."""
    gen = torch.Generator().manual_seed(0)
    repeats = 5 if smoke else 21
    with torch.inference_mode():
        a, b = torch.randn(1, 8, generator=gen), torch.randn(8, 8, generator=gen)
        calls = 200 if smoke else 2000
        per_op = per_call_seconds(lambda: torch.mm(a, b), calls=calls, repeats=repeats)
        identity = _Identity()
        module_call = per_call_seconds(lambda: identity(a), calls=calls, repeats=repeats)

        n = 256 if smoke else 1024
        x, y = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
        mm = _median_seconds(lambda: torch.mm(x, y), repeats)

        rows, cols = (1024, 1024) if smoke else (8192, 4096)
        weight = torch.randn(rows, cols, generator=gen)
        vec = torch.randn(1, cols, generator=gen)
        gemv = _median_seconds(lambda: torch.nn.functional.linear(vec, weight), repeats)
    return Calibration(
        per_op_us=per_op * 1e6,
        module_call_us=module_call * 1e6,
        matmul_gflops=2 * n**3 / mm / 1e9,
        matmul_n=n,
        gemv_gbps=weight.nbytes / gemv / 1e9,
        gemv_mbytes=weight.nbytes / 1e6,
    )


class _Identity(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def per_call_seconds(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median over `repeats` of the mean time of `calls` back-to-back calls of `fn` (for tiny ops)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
