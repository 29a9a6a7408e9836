"""A running tritonserver: start it, stream its log, wait until ready, stop it.

``start_server`` is what the tests use (free ports, log to a file, one server per session)::

    with start_server(repo, base_model, adapter_dir, log_path=tmp / "triton.log") as server:
        client = InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from server.config import (
    DEFAULT_BUILD_ROOT,
    DEFAULT_EXIT_TIMEOUT_SECS,
    LOOPBACK,
    ServerConfig,
    tritonserver_command,
    tritonserver_env,
)
from server.errors import ServerStartError
from server.ports import ensure_ports_free, pick_free_ports
from server.triton_install import TritonInstall, find_triton_install, prepare_backends

LOG = logging.getLogger(__name__)

DEFAULT_READY_TIMEOUT_S = 300.0
READY_POLL_INTERVAL_S = 0.25
STOP_MARGIN_S = 15.0
LOG_DRAIN_S = 2.0  # how long to wait for the last log lines once tritonserver has exited
TAIL_LINES = 60


class ServerProcess:
    """Handle on one tritonserver process. Use as a context manager, or call ``stop()``."""

    def __init__(
        self, popen: subprocess.Popen[bytes], config: ServerConfig, pump: _OutputPump, log_path: Path | None
    ) -> None:
        self._popen = popen
        self._pump = pump
        self.config = config
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def http_url(self) -> str:
        """``host:port`` of the HTTP endpoint, as tritonclient.http expects it."""
        return self.config.http_url

    @property
    def grpc_url(self) -> str:
        """``host:port`` of the gRPC endpoint, as tritonclient.grpc expects it."""
        return self.config.grpc_url

    @property
    def metrics_url(self) -> str:
        """``host:port`` of the Prometheus endpoint (scrape ``http://<metrics_url>/metrics``)."""
        return self.config.metrics_url

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        """One probe of ``GET /v2/health/ready``: True on HTTP 200."""
        return http_ready(self.http_url, timeout_s)

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until ready; ServerStartError (with the log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            returncode = self._popen.poll()
            if returncode is not None:
                self._pump.join(timeout=LOG_DRAIN_S)
                raise ServerStartError(
                    f"tritonserver exited with code {returncode} before it was ready. "
                    f"Last log lines:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"tritonserver was not ready after {timeout_s:.0f} s. Last log lines:\n{self.log_tail()}"
                )
            time.sleep(READY_POLL_INTERVAL_S)

    def send_signal(self, signum: int) -> None:
        """Forward ``signum`` to tritonserver if it is still running."""
        if self._popen.poll() is None:
            self._popen.send_signal(signum)

    def wait(self, timeout_s: float | None = None) -> int:
        """Wait for tritonserver to exit and return its exit status (negative: killed by a signal)."""
        returncode = self._popen.wait(timeout_s)
        self._pump.join(timeout=LOG_DRAIN_S)
        return returncode

    def stop(self, timeout_s: float | None = None) -> int:
        """Ask tritonserver to shut down (SIGINT) and return its exit status.

        It is killed if still running after ``timeout_s`` (default: its exit timeout plus a margin).
        """
        if timeout_s is None:
            timeout_s = self.config.exit_timeout_secs + STOP_MARGIN_S
        self.send_signal(signal.SIGINT)
        try:
            returncode = self.wait(timeout_s)
        except subprocess.TimeoutExpired:
            LOG.warning("tritonserver (pid %d) ignored SIGINT for %.0f s; killing it", self.pid, timeout_s)
            self._popen.kill()
            returncode = self.wait()
        self._kill_orphans()
        return returncode

    def _kill_orphans(self) -> None:
        """SIGKILL whatever is left of tritonserver's process group once it has exited: stubs that a forced
        exit orphaned (an exit timeout under load ends with the server exiting, or crashing, before them).
        Each of our models also leaves when its server is gone (`exit_with_the_server`), but only from a
        Python thread, which a stub thread blocked in a call to the dead server while holding the GIL can
        stall; the kernel needs no GIL."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)

    def kill(self) -> int:
        """SIGKILL tritonserver and its stubs at once (its own process group) and return its exit status.

        The group is killed even when tritonserver has already exited: a stub orphaned by a crash keeps
        running, and keeps open the client connections it inherited.
        """
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signal.SIGKILL)
        return self.wait()

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last ``lines`` lines tritonserver (and its stubs) wrote."""
        return self._pump.tail(lines)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def launch(
    config: ServerConfig,
    *,
    log_path: Path | None = None,
    log_stream: IO[str] | None = None,
    build_root: Path = DEFAULT_BUILD_ROOT,
    install: TritonInstall | None = None,
    base_env: Mapping[str, str] | None = None,
) -> ServerProcess:
    """Validate ``config``, check its ports, prepare the backends tree and start tritonserver.

    Does not wait for readiness. The log goes to ``log_path`` (overwritten) and/or ``log_stream``;
    the last lines are always kept for ``log_tail()``. Raises LaunchError before starting anything
    when the config is invalid or a port is busy.
    """
    config = config.validated()
    ensure_ports_free(config.ports, config.address)
    install = install or find_triton_install(base_env)
    backends_dir = prepare_backends(install, build_root)
    command = tritonserver_command(install, backends_dir, config)
    LOG.info("starting %s", shlex.join(command))
    popen = subprocess.Popen(
        command,
        env=tritonserver_env(install, config, base_env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Own session: a terminal's Ctrl-C reaches only the launcher, which forwards it once; the
        # stubs (tritonserver's children) are then shut down by tritonserver, not signalled directly.
        start_new_session=True,
        preexec_fn=die_with_parent(signal.SIGTERM),
    )
    assert popen.stdout is not None
    sinks: list[IO[str]] = [] if log_stream is None else [log_stream]
    pump = _OutputPump(popen.stdout, sinks, log_path)
    pump.start()
    return ServerProcess(popen, config, pump, log_path)


def start_server(
    model_repository: Path,
    base_model: Path | None = None,
    adapter_dir: Path | None = None,
    *,
    http_port: int | None = None,
    grpc_port: int | None = None,
    metrics_port: int | None = None,
    log_path: Path | None = None,
    log_stream: IO[str] | None = None,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    log_verbose: int = 0,
    exit_timeout_secs: int = DEFAULT_EXIT_TIMEOUT_SECS,
    extra_args: Sequence[str] = (),
    extra_repositories: Sequence[Path] = (),
    build_root: Path = DEFAULT_BUILD_ROOT,
    base_env: Mapping[str, str] | None = None,
    engine_settings: Mapping[str, Any] | None = None,
) -> ServerProcess:
    """Start tritonserver on loopback and return it once ``/v2/health/ready`` answers 200.

    ``None`` ports are picked free. ``engine_settings`` are ServerConfig's adapter-cache and tenant fields
    (adapter_device_bytes, adapter_host_bytes, preload_adapters, pinned_adapters, tenant_policy). On failure
    the server is stopped and ServerStartError carries the last log lines.
    """
    free = iter(pick_free_ports(3, LOOPBACK))
    config = ServerConfig(
        model_repository=Path(model_repository),
        base_model=None if base_model is None else Path(base_model),
        adapter_dir=None if adapter_dir is None else Path(adapter_dir),
        http_port=http_port or next(free),
        grpc_port=grpc_port or next(free),
        metrics_port=metrics_port or next(free),
        log_verbose=log_verbose,
        exit_timeout_secs=exit_timeout_secs,
        extra_args=tuple(extra_args),
        extra_repositories=tuple(Path(path) for path in extra_repositories),
        **(engine_settings or {}),
    )
    server = launch(
        config, log_path=log_path, log_stream=log_stream, build_root=build_root, base_env=base_env
    )
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def http_ready(http_url: str, timeout_s: float = 1.0) -> bool:
    """True if ``GET http://<http_url>/v2/health/ready`` answers 200 (ignoring any proxy settings)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{http_url}/v2/health/ready", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


class _OutputPump(threading.Thread):
    """Copies tritonserver's merged stdout/stderr to the sinks line by line, keeping the tail."""

    def __init__(self, pipe: IO[bytes], sinks: list[IO[str]], log_path: Path | None) -> None:
        super().__init__(name="tritonserver-log", daemon=True)
        self._pipe = pipe
        self._sinks = sinks
        self._log_path = log_path
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES * 4)
        self._lock = threading.Lock()

    def run(self) -> None:
        log_file = None if self._log_path is None else self._log_path.open("w", encoding="utf-8")
        sinks = [*self._sinks] if log_file is None else [*self._sinks, log_file]
        try:
            # The stubs hold the pipe too, so EOF comes once tritonserver and every stub have exited.
            for raw in iter(self._pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace")
                with self._lock:
                    self._tail.append(line.rstrip("\n"))
                for sink in list(sinks):
                    try:
                        sink.write(line)
                        sink.flush()
                    except (OSError, ValueError):  # closed or broken sink: keep draining the pipe
                        sinks.remove(sink)
        finally:
            self._pipe.close()
            if log_file is not None:
                log_file.close()

    def tail(self, lines: int) -> str:
        with self._lock:
            return "\n".join(list(self._tail)[-lines:])


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send ``signum`` to the child if its parent dies, so nothing is orphaned.

    Linux ties this to the thread that started the process: start children from a long-lived thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def set_parent_death_signal() -> None:
        prctl(pr_set_pdeathsig, int(signum))

    return set_parent_death_signal
