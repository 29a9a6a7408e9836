"""Self-healing: watch a running tritonserver and bring back a model whose Python stub died or hung.

Triton 2.51 restarts nothing: a dead stub leaves its model answering INTERNAL "Stub process ... is not
healthy" for ever while `/v2/health/ready` says 200, and a stub hung inside `execute` is never noticed. The
supervisor runs in the launcher and watches three things:

- the stub processes (every ``poll_s``): a stub that exited (a zombie Triton has not reaped) or is stopped;
- progress (every ``poll_s``, from ``/metrics``): a model with requests waiting while it has executed nothing
  for ``hang_timeout_s`` is hung, and its stubs are killed;
- a canary inference on every `generate` model (every ``canary_interval_s``): the truth about answers.

A model that lost its stub is healed in place through Triton's model control: first a stand-in (same name
and contract, no torch, loaded in about a second) answers every request UNAVAILABLE with the reason, then
the model is loaded again from its repository and the stand-in leaves. A model whose engine loop answers
requests after `execute` returned (it exports `multiadapter_engine_requests`) cannot be healed in place:
Triton 2.51 never answers the requests its dead stub held, so the server is restarted, which ends their
connections. If model control fails, the canary keeps failing with no known cause, or tritonserver itself
exits, the server is restarted too. Every action is logged.
"""

from __future__ import annotations

import copy
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.config import canary_tenant
from server.model_control import ModelControl, ModelControlError, ModelProgress
from server.process import STOP_MARGIN_S, ServerProcess
from server.stubs import Stub, kill, list_stubs, process_status, remove_shm_regions

LOG = logging.getLogger("server.supervisor")

STANDIN_SOURCE = Path(__file__).resolve().parent / "standin" / "model.py"
STANDIN_MESSAGE_PARAMETER = "standin_message"
ZOMBIE = "zombie"


@dataclass(frozen=True)
class HealthPolicy:
    """How often to look, and how long to wait before calling something broken."""

    poll_s: float = 0.5
    canary_interval_s: float = 5.0
    canary_timeout_s: float = 10.0
    # Longer than the slowest legitimate batch (max_tokens_cap decode steps at full batch).
    hang_timeout_s: float = 15.0
    # Canary failures in a row, with no dead or hung stub to explain them, before the server is restarted.
    canary_failures_before_restart: int = 3
    max_restarts: int = 3
    restart_window_s: float = 600.0
    ready_timeout_s: float = 300.0

    def problems(self) -> list[str]:
        problems = [
            f"{name} must be > 0, got {getattr(self, name)}"
            for name in ("poll_s", "canary_interval_s", "canary_timeout_s", "hang_timeout_s")
            if not getattr(self, name) > 0
        ]
        if self.canary_failures_before_restart < 1:
            problems.append("canary_failures_before_restart must be >= 1")
        return problems


@dataclass(frozen=True)
class Fault:
    """A stub that cannot answer any more, and why."""

    stub: Stub
    reason: str  # "exited" or "stopped" (by a signal or a debugger) or "hung"


class StubWatch:
    """Remembers every stub seen running (a dead stub's command line is gone, so its model must be known from
    before) and reports each one that exited or stopped, once.

    A stub that exited is a zombie until Triton reaps it, which it may do at once (while failing a request)
    or never. So a stub that is no longer running counts as exited when it is a zombie, or when it is gone
    while no stub runs under its instance name and its model is still loaded (``is_loaded``); a stub
    replaced by a reload, or whose model was unloaded, is simply forgotten. A fault must be seen on two polls
    in a row, which skips the instant between a normal exit and its reaping.
    """

    def __init__(self) -> None:
        self.known: dict[int, Stub] = {}
        self._suspect: set[int] = set()
        self._handled: set[int] = set()

    def poll(
        self,
        stubs: list[Stub],
        status_of: Callable[[int], str] = process_status,
        is_loaded: Callable[[str], bool] = lambda model: True,
    ) -> list[Fault]:
        running = {stub.pid: stub for stub in stubs}
        self.known.update(running)
        live_instances = {stub.instance for stub in stubs if not stub.stopped}
        faults = []
        for pid, stub in list(self.known.items()):
            if pid in running:
                dead, reason = running[pid].stopped, "stopped"
            elif status_of(pid) == ZOMBIE:
                dead, reason = True, "exited"
            elif pid in self._handled or stub.instance in live_instances or not is_loaded(stub.model):
                self._forget(pid)  # reaped after its fault was handled, replaced, or unloaded
                continue
            else:
                dead, reason = True, "exited"  # reaped by Triton, nothing in its place
            if not dead:
                self._suspect.discard(pid)
            elif pid not in self._handled:
                if pid not in self._suspect:
                    self._suspect.add(pid)
                elif reason == "exited" and not is_loaded(stub.model):
                    self._forget(pid)  # a zombie of a model being unloaded
                else:
                    faults.append(Fault(stub, reason))
                    self.mark_handled(pid)
        return faults

    def _forget(self, pid: int) -> None:
        self.known.pop(pid)
        self._suspect.discard(pid)
        self._handled.discard(pid)

    def mark_handled(self, pid: int) -> None:
        """``pid`` is dead or being killed and its model healed: never report it again."""
        self._handled.add(pid)
        self._suspect.discard(pid)

    def regions_of_dead(self) -> list[str]:
        """Shared-memory regions of handled stubs that Triton still lists (never reaped)."""
        return [self.known[pid].shm_region for pid in self._handled if pid in self.known]

    def stubs_of(self, model: str) -> list[Stub]:
        """The live stubs of ``model``."""
        return [stub for pid, stub in self.known.items() if stub.model == model and pid not in self._handled]


@dataclass
class StallWatch:
    """A model is hung when requests have waited for it for ``hang_timeout_s`` while it executed nothing.

    The clock starts when requests are first seen waiting, and starts again whenever the model executes
    something or nothing waits.
    """

    hang_timeout_s: float
    _since: dict[str, tuple[float, float]] = field(default_factory=dict)  # model -> (executions, time)

    def observe(self, progress: Mapping[str, ModelProgress], now: float) -> list[str]:
        stalled = []
        for model, sample in sorted(progress.items()):
            if sample.pending <= 0:
                self._since.pop(model, None)
                continue
            last = self._since.get(model)
            if last is None or sample.executions != last[0]:
                self._since[model] = (sample.executions, now)
                continue
            if now - last[1] >= self.hang_timeout_s:
                stalled.append(model)
                self._since[model] = (sample.executions, now)
        return stalled

    def forget(self, model: str) -> None:
        self._since.pop(model, None)


def standin_config(config: Mapping[str, Any], message: str) -> dict[str, Any]:
    """The configuration of the stand-in for a model: the model's own (name, inputs, outputs, batching,
    transaction policy), on one CPU instance, with the message it answers."""
    standin = copy.deepcopy(dict(config))
    standin["instance_group"] = [{"count": 1, "kind": "KIND_CPU"}]
    parameters = dict(standin.get("parameters") or {})
    parameters[STANDIN_MESSAGE_PARAMETER] = {"string_value": message}
    standin["parameters"] = parameters
    return standin


class Healer:
    """Brings models back through model control: a stand-in in each one's place first, then the model."""

    def __init__(self, control: ModelControl, standin_source: bytes | None = None) -> None:
        self.control = control
        self.standin_source = standin_source if standin_source is not None else STANDIN_SOURCE.read_bytes()

    def standin(self, model: str, reason: str) -> bool:
        """Load the stand-in as ``model`` (Python models only); False when the model is of another kind.
        Raises ModelControlError."""
        config = self.control.config(model)
        if config.get("backend") != "python":
            return False
        versions = sorted(
            {e["version"] for e in self.control.index() if e.get("name") == model and e.get("version")}
        ) or ["1"]
        message = f"model '{model}' is being restarted after a fault ({reason}); retry shortly"
        self.control.load(
            model,
            config=standin_config(config, message),
            files={f"{version}/model.py": self.standin_source for version in versions},
        )
        return True

    def reload(self, model: str) -> None:
        """Load ``model`` from its repository again. Raises ModelControlError."""
        self.control.load(model)


class Supervisor:
    """Watches ``server`` until it exits after ``stop()``; heals models, restarts the server when it must.

    ``relaunch`` starts a new tritonserver with the same configuration (ready or not); the supervisor waits
    for it to be ready. ``on_new_server`` tells the launcher's signal handler which process to signal.
    """

    def __init__(
        self,
        server: ServerProcess,
        policy: HealthPolicy,
        relaunch: Callable[[], ServerProcess],
        *,
        on_new_server: Callable[[ServerProcess], None] = lambda server: None,
        canary: Callable[[ServerProcess], list[Any]] | None = None,
    ) -> None:
        self.server = server
        self.policy = policy
        self._relaunch = relaunch
        self._on_new_server = on_new_server
        self._canary = canary or _canary(policy.canary_timeout_s)
        self._stopping = threading.Event()
        self._restarts: list[float] = []
        self._reset_watches()

    def _reset_watches(self) -> None:
        self.stubs = StubWatch()
        self.stalls = StallWatch(self.policy.hang_timeout_s)
        self.control = ModelControl(
            self.server.http_url, self.server.metrics_url, self.server.config.admin_token or ""
        )
        self.healer = Healer(self.control)
        self._answers_later: set[str] = set()  # models whose engine loop answers after execute returned
        self._canary_failures = 0
        self._next_canary = time.monotonic() + self.policy.canary_interval_s

    def stop(self) -> None:
        """Stop watching (an operator's signal): the server's exit is then expected."""
        self._stopping.set()

    def run(self) -> int:
        """Supervise until the server exits after ``stop()`` (or cannot be kept up); its return code."""
        try:
            while True:
                returncode = self.server.returncode
                if returncode is not None:
                    if self._stopping.is_set() or not self._restart(
                        f"tritonserver exited with code {returncode}"
                    ):
                        return self._exit_status()
                    continue
                if not self._stopping.is_set():
                    self._tick()
                self._stopping.wait(self.policy.poll_s)
                if self._stopping.is_set():
                    return self._exit_status()
        finally:
            self._clean_shared_memory()

    def _exit_status(self) -> int:
        """tritonserver's exit status once it has stopped; killed if it outlives its own exit timeout.

        Its process group is killed either way: a tritonserver that crashed on its way out leaves its stubs
        running as orphans.
        """
        patience = self.server.config.exit_timeout_secs + STOP_MARGIN_S
        try:
            returncode = self.server.wait(patience)
        except subprocess.TimeoutExpired:
            LOG.error("tritonserver still runs %.0f s after it was asked to stop; killing it", patience)
            return self.server.kill()
        self.server.kill()
        return returncode

    def _tick(self) -> None:
        faults = self.stubs.poll(list_stubs(self.server.pid), is_loaded=self.control.is_ready)
        try:
            progress = self.control.progress()
        except ModelControlError as exc:
            LOG.debug("metrics unavailable: %s", exc)
            progress = {}
        self._answers_later |= {model for model, sample in progress.items() if sample.answers_later}
        stalled = self.stalls.observe(progress, time.monotonic())
        for model in stalled:
            # Models without a Python stub (ensembles) have none: their steps are watched instead.
            faults += [Fault(stub, "hung") for stub in self.stubs.stubs_of(model)]
        if faults:
            self._heal(faults)
        if time.monotonic() >= self._next_canary:
            self._check_canary()

    def _while_alive(self, calls: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
        """Run ``calls`` (what -> call) at once, each in a thread; their results by name. The first failure
        is raised, and ModelControlError as soon as tritonserver exits (a model-control request to a crashed
        server may otherwise wait for its whole timeout)."""
        outcomes: dict[str, tuple[bool, Any]] = {}

        def run(what: str, call: Callable[[], Any]) -> None:
            try:
                outcomes[what] = (True, call())
            except BaseException as exc:  # noqa: BLE001  (re-raised in the supervisor's thread)
                outcomes[what] = (False, exc)

        workers = [
            threading.Thread(target=run, args=item, name=f"model-control: {item[0]}", daemon=True)
            for item in calls.items()
        ]
        for worker in workers:
            worker.start()
        while any(worker.is_alive() for worker in workers):
            for worker in workers:
                worker.join(self.policy.poll_s / len(workers))
            if self.server.returncode is not None:
                raise ModelControlError(f"tritonserver exited with code {self.server.returncode}")
        for ok, value in outcomes.values():
            if not ok:
                raise value
        return {what: value for what, (_, value) in outcomes.items()}

    def _heal(self, faults: list[Fault]) -> None:
        """Every faulty model gets its stand-in first (so all of them answer UNAVAILABLE at once), then all
        are loaded again together; a model-control failure restarts the server."""
        start = time.monotonic()
        models: dict[str, str] = {}
        for fault in faults:
            stub = fault.stub
            LOG.warning(
                "stub %s (pid %d) of model '%s' %s; healing the model",
                stub.instance,
                stub.pid,
                stub.model,
                {"exited": "has exited", "stopped": "is stopped", "hung": "is hung"}[fault.reason],
            )
            self.stubs.mark_handled(stub.pid)
            if fault.reason != "exited":
                kill(stub.pid)  # a stopped or hung stub holds its requests; killed, they fail at once
            models.setdefault(stub.model, f"stub {fault.reason}")
        stranded = sorted(set(models) & self._answers_later)
        if stranded:
            # Triton 2.51 cannot answer the requests such a model held: only ending tritonserver's
            # connections frees their clients, so the whole server restarts instead of healing in place.
            self._restart(
                f"model {', '.join(repr(m) for m in stranded)} answers requests from its engine loop, and "
                "Triton 2.51 strands the ones its dead stub held"
            )
            return
        try:
            standins = self._while_alive(
                {m: (lambda m=m, r=r: self.healer.standin(m, r)) for m, r in models.items()}
            )
            for model in (m for m, loaded in standins.items() if loaded):
                LOG.warning(
                    "model '%s': stand-in loaded after %.1f s; requests get UNAVAILABLE until it is back",
                    model,
                    time.monotonic() - start,
                )
            self._while_alive({m: (lambda m=m: self.healer.reload(m)) for m in models})
        except ModelControlError as exc:
            if self.server.returncode is None:
                self._restart(f"models {sorted(models)} could not be reloaded: {exc}")
            return  # a server that exited is restarted by run()
        for model in models:
            self.stalls.forget(model)
            LOG.warning("model '%s' healed in %.1f s", model, time.monotonic() - start)
        removed = remove_shm_regions(self.stubs.regions_of_dead())
        if removed:
            LOG.info("removed the dead stubs' shared memory: %s", ", ".join(removed))
        self._canary_failures = 0

    def _check_canary(self) -> None:
        self._next_canary = time.monotonic() + self.policy.canary_interval_s
        try:
            results = self._canary(self.server)
        except Exception as exc:  # noqa: BLE001  (cannot even list the models: count it as a failure)
            results, failed = [], [f"cannot list the models: {exc}"]
        else:
            failed = [f"{r.model}: {r.code}: {r.message}" for r in results if not r.ok and not r.busy]
        if not failed:
            self._canary_failures = 0
            return
        self._canary_failures += 1
        LOG.warning("canary failed (%d in a row): %s", self._canary_failures, "; ".join(failed))
        if self._canary_failures >= self.policy.canary_failures_before_restart:
            self._restart("the canary keeps failing and no dead or hung stub explains it")

    def _restart(self, reason: str) -> bool:
        """Kill tritonserver and its stubs and start it again, until it is ready; False when restarts are
        exhausted or the launcher is stopping."""
        while not self._stopping.is_set():
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < self.policy.restart_window_s]
            if len(self._restarts) >= self.policy.max_restarts:
                LOG.error(
                    "%s; giving up: %d restarts in the last %.0f s",
                    reason,
                    len(self._restarts),
                    self.policy.restart_window_s,
                )
                self.stop()
                self.server.kill()
                return False
            self._restarts.append(now)
            LOG.error("%s; restarting tritonserver", reason)
            self.server.kill()
            self._clean_shared_memory()
            self.server = self._relaunch()
            self._on_new_server(self.server)
            if self._stopping.is_set():  # a signal that reached the old process: pass it on
                self.server.send_signal(signal.SIGINT)
                return False
            try:
                self.server.wait_ready(self.policy.ready_timeout_s)
            except Exception as exc:  # noqa: BLE001  (ServerStartError, or stopped while starting)
                reason = f"the restarted tritonserver did not become ready: {exc}"
                continue
            self._reset_watches()
            LOG.warning("tritonserver restarted; ready in %.1f s", time.monotonic() - now)
            return True
        return False

    def _clean_shared_memory(self) -> None:
        """Regions of stubs that can no longer be in use: the dead ones, or all once the server is gone."""
        regions = (
            [stub.shm_region for stub in self.stubs.known.values()]
            if self.server.returncode is not None
            else self.stubs.regions_of_dead()
        )
        removed = remove_shm_regions(regions)
        if removed:
            LOG.info("removed stale shared memory: %s", ", ".join(removed))


def _canary(timeout_s: float) -> Callable[[ServerProcess], list[Any]]:
    def run(server: ServerProcess) -> list[Any]:
        from client.health import check

        token = server.config.admin_token
        tenant = canary_tenant(token) if token else None
        return check(server.http_url, "http", timeout_s=timeout_s, tenant_id=tenant)

    return run
