"""A demo server of our own for `loadtest-local`, `soak` and `loadtest-bench`: the launcher
(`python -m server`) as a subprocess on free ports, ready once `/v2/health/ready` answers, stopped by SIGINT.

The launcher runs in its own session so that a Ctrl-C at the terminal reaches Locust first: the load test
finishes its in-flight requests against a live server, and only then is the server stopped.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.traffic import ROOT
from server.config import LOOPBACK
from server.ports import pick_free_ports
from server.process import die_with_parent, http_ready

DEMO = ROOT / "models" / "demo"
READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
LOG_TAIL_LINES = 40


class LocalServerError(RuntimeError):
    """The server did not become ready; the message carries the end of its log."""


@dataclass(frozen=True)
class LocalServer:
    launcher_pid: int
    http_url: str
    grpc_url: str
    metrics_url: str
    log_path: Path


def _log_tail(path: Path) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    return "\n".join(lines[-LOG_TAIL_LINES:])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def local_server(
    log_path: Path,
    base_model: Path = DEMO / "base",
    adapter_dir: Path = DEMO / "adapters",
    ready_timeout_s: float = READY_TIMEOUT_S,
    progress: Callable[[str], None] = lambda _message: None,
    extra_args: Sequence[str] = (),
) -> Iterator[LocalServer]:
    """Start the launcher on free loopback ports (``extra_args`` appended to its command line), wait until
    ready, yield, stop it (SIGINT, then wait)."""
    http_port, grpc_port, metrics_port = pick_free_ports(3, LOOPBACK)
    command = [
        sys.executable,
        "-m",
        "server",
        "--base-model",
        str(base_model),
        "--adapter-dir",
        str(adapter_dir),
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        "--metrics-port",
        str(metrics_port),
        *extra_args,
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent(signal.SIGTERM),
        )
    server = LocalServer(
        process.pid,
        f"{LOOPBACK}:{http_port}",
        f"{LOOPBACK}:{grpc_port}",
        f"{LOOPBACK}:{metrics_port}",
        log_path,
    )
    try:
        progress(f"starting the demo server on {server.http_url} / {server.grpc_url} (log: {log_path})")
        start = time.monotonic()
        while not http_ready(server.http_url):
            if process.poll() is not None:
                raise LocalServerError(
                    f"the server exited with code {process.returncode}:\n{_log_tail(log_path)}"
                )
            if time.monotonic() - start > ready_timeout_s:
                raise LocalServerError(
                    f"the server was not ready in {ready_timeout_s:.0f} s:\n{_log_tail(log_path)}"
                )
            time.sleep(0.5)
        progress(f"server ready after {time.monotonic() - start:.0f} s")
        yield server
    finally:
        _stop(process)
