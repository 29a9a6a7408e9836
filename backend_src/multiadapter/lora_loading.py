"""Reading a PEFT LoRA adapter directory into validated tensors, refusing anything we cannot serve exactly."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .base_model import ModuleInfo
from .errors import AdapterLoadError
from .lora_config import LoraSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."
DEFAULT_MAX_ADAPTER_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class LoraModuleWeights:
    """One adapted module: a [r, in], b_scaled [out, r] with the LoRA scale folded in."""

    a: torch.Tensor
    b_scaled: torch.Tensor
    rank: int
    scale: float


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter, ready to be stored in the bank."""

    adapter_id: str
    version: str
    modules: Mapping[str, LoraModuleWeights]

    @property
    def nbytes(self) -> int:
        return sum(w.a.nbytes + w.b_scaled.nbytes for w in self.modules.values())


def content_version(*blobs: bytes) -> str:
    """Content hash of an adapter's files: 'sha256:' and the first 16 hex digits."""
    digest = hashlib.sha256()
    for blob in blobs:
        digest.update(len(blob).to_bytes(8, "little"))
        digest.update(blob)
    return "sha256:" + digest.hexdigest()[:16]


def load_lora_adapter(
    adapter_id: str,
    directory: Path,
    modules: Mapping[str, ModuleInfo],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> LoraAdapter:
    """Load and validate the adapter in `directory` against the base model's `modules`.

    Raises AdapterLoadError naming the adapter and every problem; never returns a partial adapter.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} is missing in {directory}")
    if not weights_path.is_file():
        pickles = [p for p in PICKLE_FILES if (directory / p).exists()]
        if pickles:
            raise AdapterLoadError(
                adapter_id,
                f"{pickles[0]} is a pickle file, which is never loaded; convert it offline to "
                f"{WEIGHTS_FILE} (e.g. PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True))",
            )
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is missing in {directory}")
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is {size} bytes, over the cap of {max_bytes}")

    config_bytes = config_path.read_bytes()
    try:
        raw = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} is not valid JSON ({exc})") from exc
    spec = LoraSpec.from_dict(adapter_id, raw)
    targets = _resolve_targets(spec, modules)

    weights_bytes = weights_path.read_bytes()
    tensors = read_safetensors(adapter_id, weights_path)
    problems: list[str] = []
    expected: set[str] = set()
    loaded: dict[str, LoraModuleWeights] = {}
    for name in targets:
        info = modules[name]
        params = spec.module_params(name)
        key_a, key_b = f"{_PREFIX}{name}.lora_A.weight", f"{_PREFIX}{name}.lora_B.weight"
        expected.update((key_a, key_b))
        a, b = tensors.get(key_a), tensors.get(key_b)
        if a is None or b is None:
            problems.append(f"weights for {name} are missing ({key_a if a is None else key_b})")
            continue
        want_a, want_b = (params.rank, info.in_features), (info.out_features, params.rank)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            problems.append(
                f"{name}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"(expected {want_a} / {want_b} for r={params.rank})"
            )
            continue
        if not (a.is_floating_point() and b.is_floating_point()):
            problems.append(f"{name}: weights must be floating point, got {a.dtype} / {b.dtype}")
            continue
        a32, b32 = a.to(torch.float32), b.to(torch.float32)
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            problems.append(f"{name}: weights contain NaN or infinite values")
            continue
        loaded[name] = LoraModuleWeights(
            a=a32.to(device=device, dtype=dtype),
            b_scaled=(b32 * params.scale).to(device=device, dtype=dtype),
            rank=params.rank,
            scale=params.scale,
        )
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        problems.append(
            f"{WEIGHTS_FILE} holds {len(unexpected)} tensor(s) the config does not explain "
            f"(e.g. DoRA magnitudes, embedding LoRA, modules_to_save, or a different base model): {shown}"
        )
    if problems:
        raise AdapterLoadError(adapter_id, problems)
    return LoraAdapter(adapter_id, content_version(config_bytes, weights_bytes), loaded)


def _resolve_targets(spec: LoraSpec, modules: Mapping[str, ModuleInfo]) -> list[str]:
    problems = []
    targets = []
    for name, info in modules.items():
        if not spec.targets(name, is_output_layer=info.is_output_layer, is_linear=info.adaptable):
            continue
        if not info.adaptable:
            problems.append(
                f"target_modules matches {name} ({info.type_name}); only Linear / Conv1D layers are supported"
            )
        else:
            targets.append(name)
    if not targets and not problems:
        shown = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
        problems.append(f"target_modules {shown!r} matches no module of the base model")
    if problems:
        raise AdapterLoadError(spec.adapter_id, problems)
    return targets


def read_safetensors(adapter_id: str, path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file at `path`; AdapterLoadError naming the file if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterLoadError(adapter_id, f"{path.name} is not a valid safetensors file ({exc})") from exc


def adapter_rank_summary(adapter: LoraAdapter) -> str:
    ranks = sorted({w.rank for w in adapter.modules.values()})
    return f"{len(adapter.modules)} modules, rank {ranks[0] if len(ranks) == 1 else ranks}"
