"""Answering requests away from the engine loop's thread, and noticing clients that went away.

`Responder` is one thread that runs the work of answering (detokenizing, building and sending responses) in
the order it was queued, so the loop thread only computes. `CancelWatch` polls the requests in flight for
cancellation (a gRPC stream's cancel, a disconnected client, a passed deadline) and cancels their sequences;
the loop frees their rows at its next step. Each check is a round trip to the Triton process, so requests
are polled together at a fixed interval instead of once per token.

Neither imports Triton: they hold whatever request or sender objects the model gives them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from multiadapter.work_thread import WorkThread

log = logging.getLogger(__name__)

DEFAULT_CANCEL_POLL_S = 0.1


class Responder(WorkThread):
    """Runs the work of answering, queued by the loop thread, in order; a failing piece is logged, skipped."""

    def __init__(self, name: str = "responder") -> None:
        super().__init__(name)


class Cancellable(Protocol):
    def is_cancelled(self) -> bool: ...


class CancelWatch:
    """Polls watched requests every `interval_s`; calls `on_cancel()` once for each one that is cancelled."""

    def __init__(self, interval_s: float = DEFAULT_CANCEL_POLL_S) -> None:
        self.interval_s = interval_s
        self._watched: dict[int, tuple[Cancellable, Callable[[], None]]] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cancel-watch", daemon=True)
        self._thread.start()

    def watch(self, key: int, request: Cancellable, on_cancel: Callable[[], None]) -> None:
        with self._lock:
            self._watched[key] = (request, on_cancel)

    def forget(self, key: int) -> None:
        with self._lock:
            self._watched.pop(key, None)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            with self._lock:
                watched = list(self._watched.items())
            for key, (request, on_cancel) in watched:
                try:
                    cancelled = request.is_cancelled()
                except Exception:  # the request is gone (answered meanwhile): nothing to cancel
                    cancelled = False
                if cancelled:
                    self.forget(key)
                    try:
                        on_cancel()
                    except Exception:
                        log.exception("cancelling a request failed")
