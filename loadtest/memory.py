"""Resident memory of a serving process tree over a soak run, and its growth per hour.

A leak in a long-lived server shows as a steady climb under constant load, after the warm-up (allocator
pools, caches, lazily built kernels) has settled; a least-squares line over the samples after the warm-up
gives the growth rate, as a share of the memory at the warm-up's end per hour.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from server.stubs import parse_stub_cmdline

MIB = 1024 * 1024
GROWTH_GOAL_PERCENT_PER_HOUR = 5.0


def process_label(process: psutil.Process) -> str:
    """`tritonserver`, a Python stub by its model (`generate_stream`), or the process name."""
    try:
        cmdline = process.cmdline()
        name = process.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    stub = parse_stub_cmdline(process.pid, cmdline, "")
    return stub.model if stub is not None else name


def tree_rss(root_pid: int) -> dict[str, int]:
    """RSS in bytes of each descendant of `root_pid` (not the root: our launcher), by label; several
    processes with one label are summed."""
    rss: dict[str, int] = {}
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return rss
    for child in children:
        try:
            value = child.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        label = process_label(child)
        rss[label] = rss.get(label, 0) + value
    return rss


@dataclass(frozen=True)
class MemorySample:
    elapsed_s: float
    rss: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rss.values())


class MemorySampler(threading.Thread):
    """Samples the tree every `interval_s` into memory.csv (elapsed_s, total_mib, one column per process
    label of the first sample) until stopped."""

    def __init__(self, root_pid: int, csv_path: Path, interval_s: float = 5.0) -> None:
        super().__init__(name="memory-sampler", daemon=True)
        self.root_pid = root_pid
        self.csv_path = csv_path
        self.interval_s = interval_s
        self.samples: list[MemorySample] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        start = time.monotonic()
        labels: list[str] | None = None
        with self.csv_path.open("w", newline="") as file:
            writer = csv.writer(file)
            while True:
                sample = MemorySample(time.monotonic() - start, tree_rss(self.root_pid))
                self.samples.append(sample)
                if labels is None:
                    labels = sorted(sample.rss)
                    writer.writerow(["elapsed_s", "total_mib", *(f"{label}_mib" for label in labels)])
                writer.writerow(
                    [f"{sample.elapsed_s:.1f}", f"{sample.total / MIB:.2f}"]
                    + [f"{sample.rss.get(label, 0) / MIB:.2f}" for label in labels]
                )
                file.flush()
                if self._stop_event.wait(self.interval_s):
                    return

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


@dataclass(frozen=True)
class Growth:
    """A line fitted to total RSS after the warm-up: `percent_per_hour` of the fitted value at its start."""

    samples: int
    warmup_s: float
    start_mib: float
    end_mib: float
    slope_mib_per_hour: float
    percent_per_hour: float

    @property
    def meets_goal(self) -> bool:
        return self.percent_per_hour <= GROWTH_GOAL_PERCENT_PER_HOUR


def fit_growth(samples: Sequence[MemorySample], warmup_s: float) -> Growth | None:
    """The growth of total RSS over the samples after `warmup_s`; None with fewer than 3 of them."""
    kept = [s for s in samples if s.elapsed_s >= warmup_s and s.total > 0]
    if len(kept) < 3:
        return None
    t = np.array([s.elapsed_s for s in kept])
    mib = np.array([s.total / MIB for s in kept])
    slope, intercept = np.polyfit(t, mib, 1)
    start = slope * t[0] + intercept
    return Growth(
        samples=len(kept),
        warmup_s=warmup_s,
        start_mib=float(start),
        end_mib=float(slope * t[-1] + intercept),
        slope_mib_per_hour=float(slope * 3600),
        percent_per_hour=float(slope * 3600 / start * 100),
    )


def growth_text(growth: Growth | None, samples: Sequence[MemorySample]) -> str:
    if growth is None:
        return f"memory: {len(samples)} samples, too few after the warm-up to fit a growth rate"
    met = "met" if growth.meets_goal else "NOT met"
    return (
        f"memory: {growth.samples} samples after a {growth.warmup_s:.0f} s warm-up, fitted "
        f"{growth.start_mib:.0f} -> {growth.end_mib:.0f} MiB, growth {growth.slope_mib_per_hour:+.1f} MiB/h "
        f"= "
        f"{growth.percent_per_hour:+.2f}%/h (goal <= {GROWTH_GOAL_PERCENT_PER_HOUR:g}%/h: {met})"
    )
