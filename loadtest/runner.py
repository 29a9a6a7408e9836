"""Run one Locust load test as a subprocess and judge it.

Locust runs as `sys.executable -m locust -f loadtest/locustfile.py ...` so its gevent monkey-patching stays
in its own process; this side only builds the command line, waits, reads the summary and ledger the
locustfile wrote, prints the table and decides the exit status.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.options import DEFAULT_REQUEST_TIMEOUT_S, traffic_argv
from loadtest.report import SUMMARY_MD, Summary, format_report, format_table, read_summary, verdict
from loadtest.traffic import ROOT, TrafficConfig

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
DEFAULT_OUT_ROOT = ROOT / "build" / "loadtest"
PROTOCOL_USERS = {
    "http": ("HttpGenerateUser",),
    "grpc": ("GrpcGenerateUser",),
    "both": ("HttpGenerateUser", "GrpcGenerateUser"),
    # generate_stream over gRPC streaming: answers checked like the others, plus time to first token.
    "stream": ("GrpcStreamUser",),
    "all": ("HttpGenerateUser", "GrpcGenerateUser", "GrpcStreamUser"),
}
# The transports each protocol choice uses (what must be ready before a run).
PROTOCOL_TRANSPORTS = {
    "http": ("http",),
    "grpc": ("grpc",),
    "both": ("http", "grpc"),
    "stream": ("grpc",),
    "all": ("http", "grpc"),
}
# Past the request timeout every in-flight request has an outcome (an answer or DEADLINE_EXCEEDED), so Locust
# never has to kill a user mid-request and the ledger stays exact.
STOP_TIMEOUT_MARGIN_S = 10.0
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str) -> float:
    """Seconds in "90", "20s", "10m", "1h30m", "1m30s"; ValueError for anything else or for 0."""
    match = _DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise ValueError(f"duration {text!r}: expected e.g. 20s, 10m, 1h30m")
    hours, minutes, seconds = (float(group) if group else 0.0 for group in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return total


@dataclass(frozen=True)
class LoadSettings:
    """One load test: where to, how many users, for how long, over which protocol(s), with what traffic."""

    http_url: str = "127.0.0.1:8000"
    grpc_url: str = "127.0.0.1:8001"
    users: int = 16
    spawn_rate: float = 8.0
    duration_s: float = 60.0
    protocol: str = "both"
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.users < 1:
            problems.append(f"users must be >= 1, got {self.users}")
        if self.spawn_rate <= 0:
            problems.append(f"spawn rate must be > 0, got {self.spawn_rate}")
        if self.duration_s <= 0:
            problems.append(f"duration must be > 0, got {self.duration_s}")
        if self.protocol not in PROTOCOL_USERS:
            problems.append(f"protocol must be one of {', '.join(PROTOCOL_USERS)}, got {self.protocol!r}")
        if self.request_timeout_s <= 0:
            problems.append(f"request timeout must be > 0, got {self.request_timeout_s}")
        if self.think_time_s < 0:
            problems.append(f"think time must be >= 0, got {self.think_time_s}")
        if problems:
            raise ValueError("invalid load test: " + "; ".join(problems))

    @property
    def stop_timeout_s(self) -> float:
        return self.request_timeout_s + STOP_TIMEOUT_MARGIN_S


def locust_command(
    settings: LoadSettings, report_dir: Path, run_id: str, *, headless: bool = True, web_port: int = 8089
) -> list[str]:
    """The Locust command line for `settings`: headless with CSV + HTML reports under `report_dir`, or the
    web UI (users and spawn rate as its defaults; the summary written each time a test stops there, the HTML
    report when Locust quits)."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    command += ["--host", f"http://{settings.http_url}", "--stop-timeout", f"{settings.stop_timeout_s:g}"]
    command += ["-u", str(settings.users), "-r", f"{settings.spawn_rate:g}"]
    command += ["--html", str(report_dir / "report.html")]
    if headless:
        command += ["--headless", "-t", f"{settings.duration_s:g}s"]
        command += ["--csv", str(report_dir / "locust"), "--csv-full-history"]
    else:
        command += ["--web-host", "127.0.0.1", "--web-port", str(web_port)]
    command += [
        "--triton-http",
        settings.http_url,
        "--triton-grpc",
        settings.grpc_url,
        "--request-timeout",
        f"{settings.request_timeout_s:g}",
        "--think-time",
        f"{settings.think_time_s:g}",
        "--report-dir",
        str(report_dir),
        "--run-id",
        run_id,
        *traffic_argv(settings.traffic),
        *PROTOCOL_USERS[settings.protocol],
    ]
    return command


def new_report_dir(out_root: Path, prefix: str = "") -> Path:
    """A fresh `<out_root>/<prefix><timestamp>/` (suffixed -2, -3... if a run started in the same second)."""
    stamp = prefix + time.strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        candidate = out_root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir(parents=True)
        except FileExistsError:
            continue
        return candidate
    raise RuntimeError(f"no free report directory for {stamp} under {out_root}")


@dataclass(frozen=True)
class LoadResult:
    """How one load test went: Locust's exit code, the summary it wrote (None if none), why it failed (empty
    when it passed), and what else was observed."""

    report_dir: Path
    locust_exit_code: int
    summary: Summary | None
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.reasons


def run_locust(command: Sequence[str]) -> int:
    """Run Locust in the foreground. A Ctrl-C reaches it too (same process group): it stops its users,
    writes its reports and exits, and we wait for that."""
    process = subprocess.Popen(list(command), cwd=ROOT)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return process.wait()


def judge(
    report_dir: Path, locust_exit_code: int, extra_reasons: Sequence[str] = (), notes: Sequence[str] = ()
) -> LoadResult:
    """Read what Locust wrote in `report_dir`, decide, and rewrite summary.md with the verdict."""
    summary = read_summary(report_dir)
    reasons = (*verdict(summary, locust_exit_code), *extra_reasons)
    if summary is not None:
        (report_dir / SUMMARY_MD).write_text(format_report(summary, reasons, notes))
    return LoadResult(report_dir, locust_exit_code, summary, tuple(reasons), tuple(notes))


def run_load(settings: LoadSettings, report_dir: Path, run_id: str | None = None) -> LoadResult:
    """One headless load test, reports under `report_dir`."""
    exit_code = run_locust(locust_command(settings, report_dir, run_id or report_dir.name))
    return judge(report_dir, exit_code)


def result_text(result: LoadResult) -> str:
    """What the terminal shows after a run: the table, the ledger, the verdict, where the reports are."""
    lines = [""]
    if result.summary is not None:
        lines += [format_table(result.summary), "", result.summary.ledger.line(), *result.notes]
    lines += ["", "PASS" if result.passed else "FAIL", *(f"  - {reason}" for reason in result.reasons)]
    lines += [f"reports: {result.report_dir}"]
    return "\n".join(lines)
