"""Typed client for the multi-adapter `generate` model (HTTP or gRPC); CLI: `python -m client`."""

from client.api import (
    AdapterClient,
    GenerateRequest,
    GenerateResult,
    RequestFailed,
    build_inputs,
    error_code,
    normalize_statistics,
)

__all__ = [
    "AdapterClient",
    "GenerateRequest",
    "GenerateResult",
    "RequestFailed",
    "build_inputs",
    "error_code",
    "normalize_statistics",
]
