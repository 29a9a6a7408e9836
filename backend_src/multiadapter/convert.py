"""Operator's offline tool: convert an adapter directory's pickle weights to safetensors.

    python -m multiadapter.convert <dir> [<dir> ...]

Handles AdapterHub (`pytorch_adapter.bin`, `pytorch_model_head.bin`) and PEFT (`adapter_model.bin`).
Pickles are read with `torch.load(weights_only=True)`, which refuses arbitrary objects; the server
itself never reads a pickle. Existing safetensors files are never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

CONVERSIONS = {
    "pytorch_adapter.bin": "adapter.safetensors",
    "pytorch_model_head.bin": "model_head.safetensors",
    "adapter_model.bin": "adapter_model.safetensors",
}


class ConversionError(Exception):
    pass


def convert_directory(directory: Path) -> list[Path]:
    """Write a safetensors file next to each known pickle in `directory`; returns the files written."""
    directory = Path(directory)
    pickles = [name for name in CONVERSIONS if (directory / name).is_file()]
    if not pickles:
        raise ConversionError(f"{directory}: no pickle weights to convert ({', '.join(CONVERSIONS)})")
    written = []
    for name in pickles:
        target = directory / CONVERSIONS[name]
        if target.exists():
            raise ConversionError(f"{target} exists already; remove it to convert {name} again")
        try:
            state = torch.load(directory / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for unsafe or corrupt pickles
            raise ConversionError(f"{directory / name}: cannot be read safely ({exc})") from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise ConversionError(f"{directory / name}: expected a mapping of names to tensors")
        # Clones: safetensors refuses tensors that share storage (e.g. a module registered twice).
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(target))
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m multiadapter.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("directories", nargs="+", type=Path, metavar="dir")
    args = parser.parse_args(argv)
    status = 0
    for directory in args.directories:
        try:
            for path in convert_directory(directory):
                print(f"wrote {path}")
        except ConversionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
