"""Launcher for the multi-adapter Triton server (the tritonserver shipped in the nvidia-pytriton wheel).

``python -m server`` runs it in the foreground; tests use ``start_server(...)``.
"""

from server.config import ADAPTER_DIR_ENV, BASE_MODEL_ENV, ServerConfig
from server.errors import LaunchError, ServerStartError
from server.process import ServerProcess, launch, start_server

__all__ = [
    "ADAPTER_DIR_ENV",
    "BASE_MODEL_ENV",
    "LaunchError",
    "ServerConfig",
    "ServerProcess",
    "ServerStartError",
    "launch",
    "start_server",
]
