"""Side-by-side timing: workloads interleaved round by round, ratios taken within each round.

Every round runs each workload once; the order rotates from round to round (A B, B A, A B, ...), so
neither side always runs first or always follows the other. A ratio is the median over rounds of the
two times measured in the same round, which cancels slow drift (thermal, background load) that a ratio
of two separately measured medians would not.
"""

from __future__ import annotations

import gc
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .machine import CpuMonitor


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Workload:
    """One side of a comparison. Only `run` is timed; `prepare` and `finish` wrap it untimed."""

    name: str
    run: Callable[[], object]
    prepare: Callable[[], object] = _nothing
    finish: Callable[[], object] = _nothing


@dataclass(frozen=True)
class Budget:
    """Warm-up rounds (discarded), then rounds until `seconds` have passed, within [min_rounds, max_rounds]
    (but never past 2 * seconds). A round runs every workload once."""

    warmup: int
    min_rounds: int
    max_rounds: int
    seconds: float


@dataclass(frozen=True)
class Samples:
    """Seconds per workload name, one per round, in round order."""

    seconds: dict[str, list[float]]
    rounds: int
    elapsed_s: float
    background_cores: float  # CPU cores busy with other processes during the rounds, on average

    def median_ms(self, name: str) -> float:
        return statistics.median(self.seconds[name]) * 1e3


@dataclass(frozen=True)
class RatioStat:
    """Median and quartiles of per-round ratios."""

    median: float
    q1: float
    q3: float
    n: int


def paired_ratio(samples: Samples, numerator: str, denominator: str) -> RatioStat:
    """Per-round numerator / denominator time, summarised."""
    ratios = [a / b for a, b in zip(samples.seconds[numerator], samples.seconds[denominator], strict=True)]
    if len(ratios) == 1:
        return RatioStat(ratios[0], ratios[0], ratios[0], 1)
    q1, q2, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return RatioStat(q2, q1, q3, len(ratios))


class Progress:
    """Progress lines on stderr: the measurement in progress and its round count."""

    def __init__(self, stream=sys.stderr, every_s: float = 5.0):
        self._stream = stream
        self._tty = stream.isatty()
        self._every_s = every_s
        self._last = 0.0

    def section(self, title: str) -> None:
        self._stream.write(f"[bench] {title}\n")
        self._stream.flush()
        self._last = time.monotonic()

    def round(self, label: str, done: int, budget: Budget, elapsed: float, final: bool = False) -> None:
        now = time.monotonic()
        if not (final or self._tty or now - self._last >= self._every_s):
            return
        self._last = now
        if final:
            line = f"  {label}: {done} trials in {elapsed:.1f} s"
        else:
            line = (
                f"  {label}: trial {done}/{budget.max_rounds} max ({elapsed:.0f} of {budget.seconds:.0f} s)"
            )
        if self._tty:
            self._stream.write("\r" + line + ("\n" if final else ""))
        else:
            self._stream.write(line + "\n")
        self._stream.flush()


def interleave(workloads: Sequence[Workload], budget: Budget, progress: Progress, label: str) -> Samples:
    """Run the workloads in rotating order, round by round, within `budget`."""
    names = [w.name for w in workloads]
    if len(set(names)) != len(names):
        raise ValueError(f"workload names must be unique: {names}")
    n = len(workloads)
    for _ in range(budget.warmup):
        for w in workloads:
            _timed(w)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    monitor = CpuMonitor()
    start = time.perf_counter()
    rounds = 0
    gc.disable()
    try:
        while rounds < budget.max_rounds:
            elapsed = time.perf_counter() - start
            # On a machine busy with other work, stop at twice the time box even short of min_rounds.
            if elapsed >= budget.seconds and (rounds >= budget.min_rounds or elapsed >= 2 * budget.seconds):
                break
            for k in range(n):
                w = workloads[(rounds + k) % n]
                seconds[w.name].append(_timed(w))
            rounds += 1
            progress.round(label, rounds, budget, time.perf_counter() - start)
    finally:
        gc.enable()
    elapsed = time.perf_counter() - start
    progress.round(label, rounds, budget, elapsed, final=True)
    return Samples(seconds, rounds, elapsed, monitor.background_cores())


def _timed(workload: Workload) -> float:
    workload.prepare()
    t0 = time.perf_counter()
    workload.run()
    t1 = time.perf_counter()
    workload.finish()
    return t1 - t0


def run_concurrently(count: int, n: int, one: Callable[[int], object]) -> tuple[list, float]:
    """`one(i)` for every i in range(n) with `count` threads in flight, each taking the next i when it is
    done; (results in order, wall seconds)."""
    pending: queue.SimpleQueue[int] = queue.SimpleQueue()
    for index in range(n):
        pending.put(index)
    results: list = [None] * n

    def worker() -> None:
        while True:
            try:
                index = pending.get_nowait()
            except queue.Empty:
                return
            results[index] = one(index)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(count, n))]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, time.perf_counter() - start
