"""Adapter ids are names, never paths.

Clients send ids; the server maps them to directories only under its adapter root, after checking the
name against a strict pattern and checking that the resolved directory stays under the root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import InvalidRequest

ADAPTER_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
BASE_ADAPTER_ID = ""


def check_adapter_id(adapter_id: str) -> str:
    """Return `adapter_id` if it is a valid name; raise InvalidRequest otherwise.

    The empty string means the bare base model and is valid.
    """
    if adapter_id == BASE_ADAPTER_ID:
        return adapter_id
    if not ADAPTER_ID_PATTERN.fullmatch(adapter_id) or ".." in adapter_id:
        shown = adapter_id if len(adapter_id) <= 64 else adapter_id[:64] + "..."
        raise InvalidRequest(
            f"invalid adapter_id {shown!r}: ids are names of 1-128 characters from "
            "[A-Za-z0-9._-], starting with a letter or digit (empty selects the base model)"
        )
    return adapter_id


def decode_adapter_id(raw: bytes) -> str:
    """Decode the wire form of an adapter id (UTF-8 bytes) and validate it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest("adapter_id is not valid UTF-8") from exc
    return check_adapter_id(text)


def adapter_directory(root: Path, adapter_id: str) -> Path:
    """Directory of `adapter_id` under `root`, refusing anything that resolves outside the root."""
    check_adapter_id(adapter_id)
    if adapter_id == BASE_ADAPTER_ID:
        raise InvalidRequest("the base model has no adapter directory")
    real_root = Path(os.path.realpath(root))
    candidate = Path(os.path.realpath(real_root / adapter_id))
    if candidate.parent != real_root:
        raise InvalidRequest(f"adapter {adapter_id!r} resolves outside the adapter root")
    return candidate


def discover_adapter_ids(root: Path) -> list[str]:
    """Sorted ids of the adapter directories directly under `root` (entries with invalid names skipped)."""
    found = []
    for entry in sorted(Path(root).iterdir()):
        if entry.is_dir() and ADAPTER_ID_PATTERN.fullmatch(entry.name) and ".." not in entry.name:
            found.append(entry.name)
    return found
