"""Helpers shared by the builders of generated models (tiny test model, bench fixture, demo training):
seeded weight initialisation, a build lock, and the stamp file that says whether a build is current."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for the block only (weight init draws from it); the caller's
    RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Serialise concurrent builders of one directory (e.g. parallel test sessions)."""
    with lock_path.open("w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def read_stamp(path: Path) -> dict[str, object] | None:
    """The stamp a finished build wrote last, or None if absent or unreadable (an interrupted build)."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
