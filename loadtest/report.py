"""The run's summary: per adapter requests, failures, latency percentiles, req/s and tokens/s; the verdict.

Latency comes from Locust's statistics (merged over both protocols per adapter in the Locust process, the
only place its histograms live); counts and tokens come from the ledger; the two are cross-checked here, so
a request Locust saw but the ledger did not (or the reverse) fails the run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.ledger import LedgerSnapshot, Reconciliation, Tally, reconcile

SUMMARY_JSON = "summary.json"
LEDGER_JSON = "ledger.json"
SUMMARY_MD = "summary.md"
FAILURE_EXAMPLES = 10


def stat_key(request_type: str, name: str) -> str:
    """The ledger's key for one Locust statistics entry, e.g. `HTTP generate[upper]`."""
    return f"{request_type} {name}"


def split_stat_key(key: str) -> tuple[str, str]:
    request_type, _, name = key.partition(" ")
    return request_type, name


@dataclass(frozen=True)
class Latency:
    """Locust's view of a group of requests: counts and latency percentiles in milliseconds."""

    requests: int = 0
    failures: int = 0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    p99_ms: float = math.nan


@dataclass(frozen=True)
class Row:
    """One line of the summary table."""

    label: str
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    rps: float
    tokens_per_s: float
    # Time to first token of the streamed requests (None when none was streamed).
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None


@dataclass(frozen=True)
class FailureExample:
    request_type: str
    name: str
    error: str
    occurrences: int


@dataclass(frozen=True)
class Summary:
    """What a run did. `rows` per adapter, `protocols` per request type, `total` for all; `problems` are the
    cross-checks between Locust and the ledger that failed (empty when they agree)."""

    rows: tuple[Row, ...]
    protocols: tuple[Row, ...]
    total: Row
    duration_s: float
    ledger: Reconciliation
    problems: tuple[str, ...] = ()
    failure_examples: tuple[FailureExample, ...] = ()
    run: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ledger"] = {
            "sent": self.ledger.sent,
            "ok": self.ledger.ok,
            "failures": dict(self.ledger.failures),
            "problems": list(self.ledger.problems),
            "clean": self.ledger.clean,
        }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Summary:
        ledger = data["ledger"]
        return cls(
            rows=tuple(Row(**row) for row in data["rows"]),
            protocols=tuple(Row(**row) for row in data["protocols"]),
            total=Row(**data["total"]),
            duration_s=data["duration_s"],
            ledger=Reconciliation(
                ledger["sent"], ledger["ok"], ledger["failures"], tuple(ledger["problems"])
            ),
            problems=tuple(data["problems"]),
            failure_examples=tuple(FailureExample(**f) for f in data["failure_examples"]),
            run=data["run"],
        )


def _row(label: str, latency: Latency, tally: Tally, duration_s: float) -> Row:
    per_s = 1 / duration_s if duration_s > 0 else math.nan
    return Row(
        label,
        latency.requests,
        latency.failures,
        latency.p50_ms,
        latency.p95_ms,
        latency.p99_ms,
        latency.requests * per_s,
        tally.tokens * per_s,
        _percentile(tally.first_token_ms, 50),
        _percentile(tally.first_token_ms, 95),
    )


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def build_summary(
    entries: Mapping[str, Latency],
    by_name: Mapping[str, Latency],
    by_type: Mapping[str, Latency],
    total: Latency,
    snapshot: LedgerSnapshot,
    failure_examples: Sequence[FailureExample] = (),
    run: Mapping[str, Any] | None = None,
) -> Summary:
    """The summary of a run from Locust's statistics (`entries` per stat key, the same merged per request
    name and per request type, and in total) and the ledger; the window is the ledger's first send to its
    last outcome."""
    duration_s = snapshot.duration_s
    problems = []
    for key in sorted(set(entries) | set(snapshot.tallies)):
        latency, tally = entries.get(key, Latency()), snapshot.tallies.get(key, Tally())
        if (latency.requests, latency.failures) != (tally.settled, tally.failures):
            problems.append(
                f"{key}: Locust counted {latency.requests} requests / {latency.failures} failures, "
                f"the ledger {tally.settled} / {tally.failures}"
            )
    tallies_by_name: dict[str, Tally] = {}
    tallies_by_type: dict[str, Tally] = {}
    for key, tally in snapshot.tallies.items():
        request_type, name = split_stat_key(key)
        tallies_by_name[name] = tallies_by_name.get(name, Tally()).plus(tally)
        tallies_by_type[request_type] = tallies_by_type.get(request_type, Tally()).plus(tally)
    return Summary(
        rows=tuple(
            _row(name, latency, tallies_by_name.get(name, Tally()), duration_s)
            for name, latency in sorted(by_name.items())
        ),
        protocols=tuple(
            _row(request_type, latency, tallies_by_type.get(request_type, Tally()), duration_s)
            for request_type, latency in sorted(by_type.items())
        ),
        total=_row("all", total, snapshot.total, duration_s),
        duration_s=duration_s,
        ledger=reconcile(snapshot),
        problems=tuple(problems),
        failure_examples=tuple(sorted(failure_examples, key=lambda f: -f.occurrences)[:FAILURE_EXAMPLES]),
        run=dict(run or {}),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def _rate(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def format_table(summary: Summary) -> str:
    """The per-adapter table (markdown), then one line per protocol and the total."""
    rows = (*summary.rows, *summary.protocols, summary.total)
    streamed = any(row.ttft_p50_ms is not None for row in rows)  # TTFT columns only when some streamed
    header = (
        "| adapter | requests | failures | p50 ms | p95 ms | p99 ms | req/s | tokens/s |"
        + (" TTFT p50 ms | TTFT p95 ms |" if streamed else "")
        + "\n|---|---:|---:|---:|---:|---:|---:|---:|"
        + ("---:|---:|" if streamed else "")
    )
    lines = [header]
    for index, row in enumerate(rows):
        label = f"`{row.label}`" if index < len(summary.rows) else f"**{row.label}**"
        lines.append(
            f"| {label} | {row.requests} | {row.failures} | {_ms(row.p50_ms)} | {_ms(row.p95_ms)} | "
            f"{_ms(row.p99_ms)} | {_rate(row.rps)} | {_rate(row.tokens_per_s)} |"
            + (f" {_ms(row.ttft_p50_ms)} | {_ms(row.ttft_p95_ms)} |" if streamed else "")
        )
    return "\n".join(lines)


def verdict(summary: Summary | None, locust_exit_code: int) -> list[str]:
    """Why the run failed; empty when it passed (no failure, a clean ledger agreeing with Locust)."""
    if summary is None:
        return [f"Locust wrote no summary (exit code {locust_exit_code})"]
    reasons = []
    if summary.total.requests == 0:
        reasons.append("no request was sent")
    failing = [f"{row.label} ({row.failures})" for row in summary.rows if row.failures]
    if failing:
        reasons.append(f"{summary.total.failures} failed request(s): {', '.join(failing)}")
    reasons += [f"ledger: {problem}" for problem in summary.ledger.problems]
    reasons += [f"Locust and the ledger disagree: {problem}" for problem in summary.problems]
    if locust_exit_code != 0 and not reasons:
        reasons.append(f"Locust exited with code {locust_exit_code} (an exception in the load test?)")
    return reasons


def format_report(summary: Summary, reasons: Sequence[str], notes: Sequence[str] = ()) -> str:
    """The markdown report: run settings, the table, the ledger, failure examples and the verdict."""
    run = ", ".join(f"{key} {value}" for key, value in summary.run.items())
    lines = [
        "# Load test",
        "",
        *([run, ""] if run else []),
        f"{summary.duration_s:.1f} s from the first request sent to the last answer.",
        "",
        format_table(summary),
        "",
        summary.ledger.line(),
        *notes,
    ]
    if summary.failure_examples:
        lines += ["", "Failures (most frequent first):", ""]
        lines += [
            f"- {f.request_type} {f.name} x{f.occurrences}: {f.error}" for f in summary.failure_examples
        ]
    lines += ["", "PASS" if not reasons else "FAIL", *(f"- {reason}" for reason in reasons)]
    return "\n".join(lines) + "\n"


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as JSON via a temporary file, so a reader never sees half of it."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n")
    partial.replace(path)


def read_summary(report_dir: Path) -> Summary | None:
    path = report_dir / SUMMARY_JSON
    if not path.is_file():
        return None
    return Summary.from_dict(json.loads(path.read_text()))
