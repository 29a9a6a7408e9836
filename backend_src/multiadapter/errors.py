"""Typed errors. Each carries the category that the serving boundary maps to a Triton error code.

`RequestError` subclasses belong to one request; the rest of its batch is unaffected.
`AdapterLoadError` and `ConfigError` are raised while loading and name the adapter / field at fault.
"""

from __future__ import annotations

from enum import Enum


class ErrorKind(Enum):
    INVALID_ARG = "INVALID_ARG"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    CANCELLED = "CANCELLED"
    INTERNAL = "INTERNAL"


class RequestError(Exception):
    """An error that fails one request only."""

    kind: ErrorKind = ErrorKind.INTERNAL


class InvalidRequest(RequestError):
    kind = ErrorKind.INVALID_ARG


class AdapterNotFound(RequestError):
    kind = ErrorKind.NOT_FOUND

    def __init__(self, adapter_id: str, refused_because: str | None = None):
        shown = adapter_id if len(adapter_id) <= 64 else adapter_id[:64] + "..."
        if refused_because is None:
            message = f"adapter {shown!r} does not exist on this server"
        else:
            message = f"adapter {shown!r} is not servable: {refused_because}"
        super().__init__(message)
        self.adapter_id = adapter_id


class Unavailable(RequestError):
    kind = ErrorKind.UNAVAILABLE


class Cancelled(RequestError):
    """The client cancelled the request, went away, or passed its deadline; its row was freed."""

    kind = ErrorKind.CANCELLED


class ConfigError(ValueError):
    """Server configuration is invalid; lists every problem found."""

    def __init__(self, where: str, problems: list[str]):
        self.problems = list(problems)
        super().__init__(f"{where}: " + "; ".join(self.problems))


class AdapterLoadError(ValueError):
    """An adapter cannot be served. The message names the adapter and every field at fault."""

    def __init__(self, adapter_id: str, problems: list[str] | str):
        self.adapter_id = adapter_id
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(f"adapter {adapter_id!r} refused: " + "; ".join(self.problems))
