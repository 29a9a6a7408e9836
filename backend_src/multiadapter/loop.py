"""The engine's thread: it runs the `Scheduler` step after step while there is work, and nothing else does.

Other threads (Triton's `execute`, a test) `submit` sequences with a listener and may `cancel` them; the loop
admits them at its next step boundary. Listeners are called on the loop thread, after the step, outside the
model lock: `on_tokens` with each step's new tokens, then `on_finish` exactly once, with the sequence's
`finish_reason` set (or its `error`, when the step failed or the loop stopped).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from .errors import RequestError, Unavailable
from .scheduler import ERROR, Scheduler, Sequence, StepResult
from .work_thread import WorkThread

log = logging.getLogger(__name__)


class TorchThread(WorkThread):
    """One thread for all of an engine's torch work: loading the model, then its loop (or its batches).

    With OpenMP (torch's CPU intra-op threads), a thread that runs ops after another thread already has is
    much slower: measured on 2 cores, the same loop's decode steps took 2.3-3x as long on a second thread as
    on the thread that had loaded the model. So the model is loaded on this thread and every step runs here;
    the serving threads (Triton's `execute`, the responder) run no torch ops.
    """

    def __init__(self, name: str = "engine") -> None:
        super().__init__(name)


class SequenceListener(Protocol):
    def on_tokens(self, seq: Sequence, tokens: list[int]) -> None: ...

    def on_finish(self, seq: Sequence, error: Exception | None) -> None: ...


class EngineLoop:
    """Drives `scheduler` from its own thread; `model_lock` is held for each step (the model's one user).

    `on_step(result, waiting, running)` is called on the loop thread after each step.
    """

    def __init__(
        self,
        scheduler: Scheduler,
        model_lock: threading.Lock,
        on_step: Callable[[StepResult, int, int], None] = lambda result, waiting, running: None,
        max_waiting: int = 128,
        thread: TorchThread | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.max_waiting = max_waiting
        self._model_lock = model_lock
        self._on_step = on_step
        self._wake = threading.Condition()
        self._incoming: list[tuple[Sequence, SequenceListener]] = []
        self._listeners: dict[int, SequenceListener] = {}
        self._stopping: Exception | None = None
        # Runs on `thread` when given (the one that loaded the model), else on a thread of its own.
        self._torch_thread = thread
        self._thread = None if thread else threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._exited = threading.Event()
        self.steps = 0

    def start(self) -> None:
        if self._torch_thread is not None:
            self._torch_thread.put(self._run)
        else:
            self._thread.start()

    def submit(self, seq: Sequence, listener: SequenceListener) -> None:
        """Queue `seq`; its listener hears from the loop thread. After `stop`, or when `max_waiting`
        sequences already wait, it fails at once (UNAVAILABLE) in the caller's thread."""
        with self._wake:
            error = self._stopping
            waiting = len(self.scheduler.waiting) + len(self._incoming)
            if error is None and waiting >= self.max_waiting:
                error = Unavailable(f"the engine's queue is full ({waiting} requests wait); retry later")
            if error is None:
                self._incoming.append((seq, listener))
                self._wake.notify()
                return
        seq.error, seq.finish_reason = error, ERROR
        listener.on_finish(seq, error)

    def cancel(self, seq: Sequence) -> None:
        """Ask for `seq` to end with CANCELLED at the next step boundary (wherever it is)."""
        seq.cancelled = True
        with self._wake:
            self._wake.notify()

    def stop(self, error: Exception | None = None, timeout_s: float = 30.0) -> None:
        """Stop the thread; every sequence not yet finished ends with `error` (default: UNAVAILABLE)."""
        with self._wake:
            self._stopping = error or Unavailable("the model is being unloaded")
            self._wake.notify()
        self._exited.wait(timeout_s)

    @property
    def pending(self) -> tuple[int, int]:
        """(waiting, running) sequences, prefilling counted as running; read without the lock."""
        return len(self.scheduler.waiting) + len(self._incoming), len(self.scheduler.active)

    def _run(self) -> None:
        try:
            self._steps()
        finally:
            self._exited.set()

    def _steps(self) -> None:
        while True:
            with self._wake:
                while self._stopping is None and not self._incoming and not self._has_work():
                    self._wake.wait()
                if self._stopping is not None:
                    break
                incoming, self._incoming = self._incoming, []
            for seq, listener in incoming:
                self._listeners[id(seq)] = listener
                self.scheduler.add(seq)
            try:
                with self._model_lock:
                    result = self.scheduler.step()
            except Exception as exc:  # a model-wide failure: every sequence in flight fails, the loop goes on
                log.exception("engine step failed; failing every sequence in flight")
                failure = exc if isinstance(exc, RequestError) else RuntimeError(f"engine step failed: {exc}")
                for seq in self.scheduler.drain():
                    self._finish(seq, failure)
                continue
            self.steps += 1
            self._deliver(result)
            self._call(self._on_step, result, *self.pending)
        with self._wake:
            leftover, self._incoming = self._incoming, []
        for seq, listener in leftover:
            seq.error, seq.finish_reason = self._stopping, ERROR
            self._call(listener.on_finish, seq, self._stopping)
        for seq in self.scheduler.drain():
            self._finish(seq, self._stopping)

    def _has_work(self) -> bool:
        # Cancelled sequences need a step to be retired even when nothing else moves.
        return self.scheduler.has_work

    def _deliver(self, result: StepResult) -> None:
        new: dict[int, tuple[Sequence, list[int]]] = {}
        for seq, token in result.tokens:
            new.setdefault(id(seq), (seq, []))[1].append(token)
        for seq, tokens in new.values():
            listener = self._listeners.get(id(seq))
            if listener is not None:
                self._call(listener.on_tokens, seq, tokens)
        for seq in result.finished:
            self._finish(seq, seq.error)

    def _finish(self, seq: Sequence, error: Exception | None) -> None:
        if error is not None:
            seq.error, seq.finish_reason = error, ERROR
        listener = self._listeners.pop(id(seq), None)
        if listener is not None:
            self._call(listener.on_finish, seq, error)

    @staticmethod
    def _call(method: Callable[..., None], *args: object) -> None:
        try:
            method(*args)
        except Exception:  # a listener's bug must not stop the loop or other requests
            log.exception("a sequence listener failed")
