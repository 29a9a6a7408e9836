"""Parsers for string settings (model parameters, environment, launcher flags). No torch here."""

from __future__ import annotations

import re

from .adapter_ids import check_adapter_id

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 1000, "mb": 10**6, "gb": 10**9}


def parse_bytes(text: str) -> int:
    """'1073741824', '512MiB', '2 GiB', '100MB' -> bytes. Raises ValueError."""
    match = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size (an integer, optionally with B, KiB, MiB, GiB, KB, MB or GB)"
        )
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def adapter_id_list(text: str) -> tuple[str, ...]:
    """'a,b, c' -> ('a', 'b', 'c'); each checked as an adapter id. Raises ValueError."""
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    for adapter_id in ids:
        try:
            check_adapter_id(adapter_id)
        except Exception as exc:  # InvalidRequest: a configuration problem here
            raise ValueError(str(exc)) from exc
    return ids


# The base's quantization at load (quantization.py); here for the torch-free launcher's checks.
QUANTIZATIONS = ("none", "nf4", "int8")


def check_quantization(method: str) -> list[str]:
    """Problems with a quantization setting (none when it is a known method)."""
    if method not in QUANTIZATIONS:
        return [f"quantization must be one of {list(QUANTIZATIONS)}, got {method!r}"]
    return []
