"""Exceptions of the launcher. Their messages are written for the person starting the server."""

from __future__ import annotations


class LaunchError(Exception):
    """The server cannot be started as configured (bad path, port in use, missing stub, ...)."""


class ServerStartError(LaunchError):
    """tritonserver was started but did not become ready; the message ends with its last log lines."""
