"""A thread that runs queued work in order: the engine's torch thread and the responder are both one.

Torch-free, so the serving code that imports it (the responder of `generate_stream`) stays light.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class WorkThread:
    """Runs callables one after the other on its own daemon thread; a failing one is logged and skipped."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, work: Callable[[], None]) -> None:
        """Run `work` on this thread without waiting (it may occupy the thread until it returns)."""
        self._queue.put(work)

    def call(self, work: Callable[[], T]) -> T:
        """Run `work` on this thread and return its result (or raise its exception) here."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["result"] = work()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            finally:
                done.set()

        self._queue.put(run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def stop(self, timeout_s: float = 30.0) -> None:
        """End the thread once the work queued before has run."""
        self._queue.put(None)
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except Exception:  # one piece of work failing must not stop the others
                log.exception("work on thread %s failed", self._thread.name)
