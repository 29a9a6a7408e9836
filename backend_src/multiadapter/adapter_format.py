"""Which kind of adapter a directory holds: PEFT LoRA or AdapterHub bottleneck."""

from __future__ import annotations

import json
from pathlib import Path

from .bottleneck_config import is_adapterhub_config
from .errors import AdapterLoadError
from .lora_loading import PICKLE_FILES as LORA_PICKLES

LORA, BOTTLENECK = "lora", "bottleneck"
_FILES_OF = {
    LORA: ("adapter_model.safetensors", *LORA_PICKLES),
    BOTTLENECK: ("adapter.safetensors", "pytorch_adapter.bin"),
}


def adapter_format(adapter_id: str, directory: Path) -> str:
    """LORA (PEFT) or BOTTLENECK (AdapterHub), from the weight files present and the config's content.

    PEFT's adapter_config.json has `peft_type`; AdapterHub's has `config` and metadata. When both signals
    exist and disagree the adapter is refused; with neither, the PEFT loader reports what is missing.
    """
    by_files = {kind for kind, names in _FILES_OF.items() if any((directory / n).exists() for n in names)}
    try:
        raw = json.loads((directory / "adapter_config.json").read_bytes())
    except (OSError, ValueError):
        raw = None  # the loader chosen by the files reports the unreadable config
    by_config = {BOTTLENECK if is_adapterhub_config(raw) else LORA} if isinstance(raw, dict) else set()
    if len(by_files) > 1:
        raise AdapterLoadError(adapter_id, "the directory holds both PEFT and AdapterHub weight files")
    if by_files and by_config and by_files != by_config:
        (files,), (config,) = by_files, by_config
        raise AdapterLoadError(
            adapter_id,
            f"the weight files are {_NAMES[files]}'s but adapter_config.json is {_NAMES[config]}'s",
        )
    return next(iter(by_files or by_config or {LORA}))


_NAMES = {LORA: "PEFT LoRA", BOTTLENECK: "AdapterHub"}
