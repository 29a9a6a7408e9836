"""The Python-backend stub processes of a running tritonserver, read from the process table.

Triton starts one ``triton_python_backend_stub`` per Python model instance, as its own child, with a command
line of the form::

    triton_python_backend_stub <model.py> <shm region> <shm size> <shm growth> <parent pid> <backend dir>
                               <ipc handle> <instance name> <runtime dir>

Triton 2.51 never restarts a stub that died, and a stub that is stopped or dead is still listed (a zombie)
until Triton reaps it when the instance unloads. The supervisor reads this table to tell which model lost its
stub, and which shared-memory region was the dead stub's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

STUB_BINARY = "triton_python_backend_stub"
SHM_DIR = Path("/dev/shm")
# Default instance names are <model>_<group index>_<instance index>.
_INSTANCE_NAME = re.compile(r"^(?P<model>.+)_\d+_\d+$")
_DEAD = {psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD}
_STOPPED = {psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP}


@dataclass(frozen=True)
class Stub:
    """One stub process. ``status`` is psutil's (running, sleeping, zombie, stopped, ...)."""

    pid: int
    model: str
    instance: str
    shm_region: str
    status: str

    @property
    def dead(self) -> bool:
        return self.status in _DEAD

    @property
    def stopped(self) -> bool:
        """Stopped by a signal or a tracer: it cannot answer, though the process still exists."""
        return self.status in _STOPPED


def parse_stub_cmdline(pid: int, argv: list[str], status: str) -> Stub | None:
    """A Stub from a process's argv, or None when it is not a model instance's stub (auto-complete stubs
    and anything else are skipped)."""
    if len(argv) < 9 or Path(argv[0]).name != STUB_BINARY:
        return None
    instance = argv[8]
    match = _INSTANCE_NAME.match(instance)
    if match is None:
        return None
    return Stub(pid=pid, model=match["model"], instance=instance, shm_region=argv[2], status=status)


def list_stubs(server_pid: int) -> list[Stub]:
    """The stubs that are children of ``server_pid`` (dead ones included), by pid."""
    try:
        children = psutil.Process(server_pid).children()
    except psutil.NoSuchProcess:
        return []
    stubs = []
    for child in children:
        try:
            with child.oneshot():
                stub = parse_stub_cmdline(child.pid, child.cmdline(), child.status())
        except psutil.ZombieProcess:  # a zombie's command line is gone; it was read while it lived
            stub = None
        except psutil.NoSuchProcess:
            continue
        if stub is not None:
            stubs.append(stub)
    return sorted(stubs, key=lambda s: s.pid)


def process_status(pid: int) -> str:
    """psutil's status of ``pid``, or ``dead`` when there is no such process."""
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return psutil.STATUS_DEAD


def kill(pid: int) -> None:
    """SIGKILL ``pid`` if it still exists (a stopped process dies too)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.Process(pid).kill()


def remove_shm_regions(names: Iterable[str], shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the named shared-memory regions that are still there; returns the ones removed.

    Only regions of stubs known to be dead belong here: the name is what a new process would map, and a
    region that a live tritonserver still maps keeps its pages until it unmaps them.
    """
    removed = []
    for name in names:
        if "/" in name or not name:
            continue
        path = shm_dir / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(name)
    return removed
