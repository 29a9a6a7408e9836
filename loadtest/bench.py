"""`make loadtest-bench`: the same load test at several user counts against one server; a table and a plot.

Each point is a full, checked load test (a point with failures is reported as such, not dropped), so the
throughput figures are of correct answers only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.host import cpu_model, usable_cores
from loadtest.report import Summary


@dataclass(frozen=True)
class BenchPoint:
    users: int
    requests: int
    failures: int
    rps: float
    tokens_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    passed: bool

    @classmethod
    def of(cls, users: int, summary: Summary, passed: bool) -> BenchPoint:
        total = summary.total
        return cls(
            users,
            total.requests,
            total.failures,
            total.rps,
            total.tokens_per_s,
            total.p50_ms,
            total.p95_ms,
            total.p99_ms,
            passed,
        )


def bench_markdown(points: Sequence[BenchPoint], *, date: str, duration_s: float, setting: str) -> str:
    """The table: one row per user count, with the machine and date."""
    lines = [
        "# Load test at several user counts",
        "",
        f"{date}, {cpu_model()}, {usable_cores()} usable cores; {setting}; {duration_s:g} s per point.",
        "",
        "| users | requests | failures | req/s | tokens/s | p50 ms | p95 ms | p99 ms | checked |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        lines.append(
            f"| {p.users} | {p.requests} | {p.failures} | {p.rps:.1f} | {p.tokens_per_s:.1f} | "
            f"{p.p50_ms:.0f} | {p.p95_ms:.0f} | {p.p99_ms:.0f} | {'pass' if p.passed else 'FAIL'} |"
        )
    return "\n".join(lines) + "\n"


def plot(points: Sequence[BenchPoint], path: Path, title: str) -> None:
    """Latency percentiles (left) and throughput (right) against users, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    users = [p.users for p in points]
    figure, (latency, throughput) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, values in (
        ("p50", [p.p50_ms for p in points]),
        ("p95", [p.p95_ms for p in points]),
        ("p99", [p.p99_ms for p in points]),
    ):
        latency.plot(users, values, marker="o", label=label)
    latency.set(xlabel="users", ylabel="latency (ms)", title="latency percentiles")
    latency.legend()
    latency.grid(alpha=0.3)
    throughput.plot(users, [p.rps for p in points], marker="o", color="tab:blue", label="req/s")
    throughput.set(xlabel="users", ylabel="requests / s", title="throughput")
    throughput.grid(alpha=0.3)
    tokens = throughput.twinx()
    tokens.plot(users, [p.tokens_per_s for p in points], marker="s", color="tab:orange", label="tokens/s")
    tokens.set_ylabel("tokens / s")
    handles = throughput.get_legend_handles_labels()[0] + tokens.get_legend_handles_labels()[0]
    throughput.legend(handles, [h.get_label() for h in handles], loc="best")
    for axes in (latency, throughput, tokens):
        axes.set_ylim(bottom=0)  # a flat line must look flat, not magnified
    for axes in (latency, throughput):
        axes.set_xticks(users)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
