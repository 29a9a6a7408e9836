"""The adapter store: one folder per adapter id under `ADAPTER_DIR`, read on demand.

The store is the slowest tier of the adapter cache (see `adapter_manager.py`). It lists ids, tells whether an
adapter's files changed since they were read (a `Fingerprint`: cheap `stat` calls, no reading), and loads an
adapter fully validated into host memory. Ids are names, never paths: a folder or file that resolves outside
the store is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .adapter_format import LORA, adapter_format
from .adapter_ids import adapter_directory, discover_adapter_ids
from .bottleneck_loading import BottleneckAdapter
from .errors import AdapterLoadError, InvalidRequest
from .lora_loading import LoraAdapter

Adapter = LoraAdapter | BottleneckAdapter
# Loads one validated adapter from its folder: (adapter_id, directory) -> Adapter, or AdapterLoadError.
Loader = Callable[[str, Path], Adapter]


@dataclass(frozen=True)
class Fingerprint:
    """What `stat` says about an adapter folder's files: (name, inode, size, mtime_ns, ctime_ns) each.

    ctime changes with every write or rename and cannot be set back, so a file replaced in place, renamed
    over, or copied with its old mtime still changes the fingerprint."""

    files: tuple[tuple[str, int, int, int, int], ...]


def kind_and_shape(adapter: Adapter) -> tuple[str, str]:
    """('lora', 'r=8') or ('bottleneck', 'width=16'): what the listing shows."""
    if isinstance(adapter, BottleneckAdapter):
        widths = sorted({w.size for w in adapter.places.values()})
        return "bottleneck", "width=" + "/".join(map(str, widths))
    ranks = sorted({w.rank for w in adapter.modules.values()})
    return "lora", "r=" + "/".join(map(str, ranks))


class AdapterStore:
    """Adapters on disk under `root`; `load` validates with `loader`."""

    def __init__(self, root: Path, loader: Loader) -> None:
        self.root = Path(root)
        self._loader = loader

    def ids(self) -> list[str]:
        """Sorted ids of the folders in the store (folders with invalid names are not adapters)."""
        try:
            return discover_adapter_ids(self.root)
        except OSError:
            return []

    def fingerprint(self, adapter_id: str) -> Fingerprint | None:
        """The folder's fingerprint; None when the store has no such folder (never there, or deleted)."""
        try:
            directory = adapter_directory(self.root, adapter_id)
        except InvalidRequest:
            return None
        try:
            names = sorted(os.listdir(directory))
        except OSError:  # gone, not a directory, unreadable
            return None
        files = []
        for name in names:
            try:
                st = os.stat(directory / name)  # follows links: a link's target is what gets read
            except OSError:
                continue  # a dangling link or a file deleted meanwhile; the loader reports what it misses
            files.append((name, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return Fingerprint(tuple(files))

    def peek(self, adapter_id: str) -> tuple[str, str, int]:
        """What the listing can say of an adapter not loaded, cheaply: (kind, shape, bytes of its weight
        files). The shape is LoRA's rank from its config ("" for a bottleneck: its width depends on the
        base); nothing here validates, and what cannot be read is left empty."""
        try:
            directory = adapter_directory(self.root, adapter_id)
            kind = adapter_format(adapter_id, directory)
            nbytes = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
        except (InvalidRequest, AdapterLoadError, OSError):
            return "", "", 0
        shape = ""
        if kind == LORA:
            try:
                rank = json.loads((directory / "adapter_config.json").read_bytes()).get("r")
            except (OSError, ValueError, AttributeError):
                rank = None
            shape = f"r={rank}" if isinstance(rank, int) else ""
        return kind, shape, nbytes

    def load(self, adapter_id: str) -> Adapter:
        """The adapter, fully validated, in host memory. Raises AdapterLoadError with every reason."""
        try:
            directory = adapter_directory(self.root, adapter_id)
        except InvalidRequest as exc:
            raise AdapterLoadError(adapter_id, str(exc)) from exc
        if not directory.is_dir():
            raise AdapterLoadError(adapter_id, "its folder is missing from the adapter store")
        outside = [
            entry.name
            for entry in directory.iterdir()
            if entry.is_symlink() and Path(os.path.realpath(entry)).parent != directory
        ]
        if outside:
            raise AdapterLoadError(
                adapter_id, f"{', '.join(sorted(outside))} link(s) to a file outside the adapter's folder"
            )
        return self._loader(adapter_id, directory)
