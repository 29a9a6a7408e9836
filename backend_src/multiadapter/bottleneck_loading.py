"""Reading an AdapterHub bottleneck adapter directory into validated tensors, refusing what we cannot serve.

The directory is what `save_adapter(dir, name, use_safetensors=True)` writes: `adapter_config.json` and
`adapter.safetensors`, usually with `head_config.json` + `model_head.safetensors` (the base's own output
layer; accepted only when it equals the base's, since we never swap the head per row).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .base_model import BottleneckLayout
from .bottleneck import ATTENTION, BottleneckPlace, BottleneckWeights
from .bottleneck_config import BottleneckSpec
from .errors import AdapterLoadError
from .lora_loading import DEFAULT_MAX_ADAPTER_BYTES, content_version, read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"
HEAD_FILE = "model_head.safetensors"
PICKLE_HEAD_FILE = "pytorch_model_head.bin"
CONVERT_COMMAND = "python -m multiadapter.convert"
_INFIX = {ATTENTION: "attention_adapters", "ffn": "output_adapters"}


@dataclass(frozen=True)
class BottleneckAdapter:
    """A validated bottleneck adapter, ready to be stored in the bank: its weights by place."""

    adapter_id: str
    version: str
    places: Mapping[BottleneckPlace, BottleneckWeights]

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.places.values())


def load_bottleneck_adapter(
    adapter_id: str,
    directory: Path,
    layout: BottleneckLayout | None,
    *,
    output_weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    max_bytes: int = DEFAULT_MAX_ADAPTER_BYTES,
) -> BottleneckAdapter:
    """Load and validate the adapter in `directory` against the base model's bottleneck `layout`
    (None: the base architecture has none). `output_weight` is the base's output layer weight [V, H],
    compared with a saved prediction head. Raises AdapterLoadError naming every problem."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} is missing in {directory}")
    if not weights_path.is_file():
        if (directory / PICKLE_FILE).exists():
            raise AdapterLoadError(
                adapter_id,
                f"{PICKLE_FILE} is a pickle file, which is never loaded; convert it offline with "
                f"`{CONVERT_COMMAND} {directory}` (writes {WEIGHTS_FILE})",
            )
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is missing in {directory}")
    if (directory / PICKLE_HEAD_FILE).exists() and not (directory / HEAD_FILE).exists():
        raise AdapterLoadError(
            adapter_id,
            f"{PICKLE_HEAD_FILE} is a pickle file, which is never loaded; convert it offline with "
            f"`{CONVERT_COMMAND} {directory}`",
        )
    size = weights_path.stat().st_size
    if size > max_bytes:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is {size} bytes, over the cap of {max_bytes}")

    config_bytes = config_path.read_bytes()
    try:
        raw = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} is not valid JSON ({exc})") from exc
    spec = BottleneckSpec.from_dict(adapter_id, raw)
    if layout is None:
        raise AdapterLoadError(adapter_id, "the base model's architecture has no bottleneck adapter places")
    problems = []
    if spec.model_type != layout.model_type:
        problems.append(
            f"model_type: the adapter is for {spec.model_type!r}, the base is {layout.model_type!r}"
        )
    if spec.hidden_size != layout.hidden_size:
        problems.append(
            f"hidden_size: the adapter is for {spec.hidden_size}, the base has {layout.hidden_size}"
        )
    out_of_range = [i for i in spec.leave_out if i >= layout.num_layers]
    if out_of_range:
        problems.append(f"leave_out: layers {out_of_range} do not exist (the base has {layout.num_layers})")
    if problems:
        raise AdapterLoadError(adapter_id, problems)

    weights_bytes = weights_path.read_bytes()
    tensors = read_safetensors(adapter_id, weights_path)
    expected: set[str] = set()
    loaded: dict[BottleneckPlace, BottleneckWeights] = {}
    hidden = layout.hidden_size
    for layer in range(layout.num_layers):
        width = spec.bottleneck_size(layer, hidden)
        if width is None and spec.positions(layer):
            problems.append(f"reduction_factor: no value for layer {layer} and no 'default'")
            continue
        for position in spec.positions(layer):
            prefix = f"{layout.layers_path}.{layer}.{_INFIX[position]}.adapters.{spec.name}."
            want = {
                "adapter_down.0.weight": (width, hidden),
                "adapter_down.0.bias": (width,),
                "adapter_up.weight": (hidden, width),
                "adapter_up.bias": (hidden,),
            }
            if spec.ln_after:
                want.update({"adapter_norm_after.weight": (hidden,), "adapter_norm_after.bias": (hidden,)})
            if spec.scaling == "learned":
                want["scaling"] = (1,)
            elif spec.scaling == "channel":
                want["scaling"] = (hidden,)
            expected.update(prefix + k for k in want)
            got = _checked(tensors, prefix, want, problems)
            if got is None:
                continue
            scale = got["scaling"] if "scaling" in got else torch.tensor([float(spec.scaling)])
            loaded[BottleneckPlace(layer, position)] = BottleneckWeights(
                form=spec.form,
                down=_to(got["adapter_down.0.weight"], dtype, device),
                down_bias=_to(got["adapter_down.0.bias"], dtype, device),
                up_scaled=_to(got["adapter_up.weight"] * scale[:, None], dtype, device),
                up_bias_scaled=_to(got["adapter_up.bias"] * scale, dtype, device),
                ln_after_weight=_to(got.get("adapter_norm_after.weight"), dtype, device),
                ln_after_bias=_to(got.get("adapter_norm_after.bias"), dtype, device),
            )
    unexpected = sorted(set(tensors) - expected)
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (" ..." if len(unexpected) > 5 else "")
        problems.append(
            f"{WEIGHTS_FILE} holds {len(unexpected)} tensor(s) the config does not explain "
            f"(another adapter name, layer or position, or a different base model): {shown}"
        )
    problems.extend(_head_problems(adapter_id, directory, output_weight))
    if problems:
        raise AdapterLoadError(adapter_id, problems)
    return BottleneckAdapter(adapter_id, content_version(config_bytes, weights_bytes), loaded)


def _checked(
    tensors: Mapping[str, torch.Tensor], prefix: str, want: Mapping[str, tuple[int, ...]], problems: list[str]
) -> dict[str, torch.Tensor] | None:
    """The tensors under `prefix` with the wanted shapes, in float32; None (problems noted) otherwise."""
    found: dict[str, torch.Tensor] = {}
    for key, shape in want.items():
        tensor = tensors.get(prefix + key)
        if tensor is None:
            problems.append(f"weights are missing: {prefix + key}")
        elif tuple(tensor.shape) != shape:
            problems.append(
                f"{prefix + key}: shape {tuple(tensor.shape)} does not fit the base (expected {shape})"
            )
        elif not tensor.is_floating_point():
            problems.append(f"{prefix + key}: weights must be floating point, got {tensor.dtype}")
        elif not torch.isfinite(tensor.to(torch.float32)).all():
            problems.append(f"{prefix + key}: weights contain NaN or infinite values")
        else:
            found[key] = tensor.to(torch.float32)
    return found if len(found) == len(want) else None


def _head_problems(adapter_id: str, directory: Path, output_weight: torch.Tensor | None) -> list[str]:
    head_path = directory / HEAD_FILE
    if not head_path.is_file():
        return []
    head = read_safetensors(adapter_id, head_path)
    weights = [t for k, t in head.items() if k.endswith("weight")]
    same = (
        output_weight is not None
        and len(head) == 1
        and len(weights) == 1
        and tuple(weights[0].shape) == tuple(output_weight.shape)
        and torch.equal(weights[0].to(output_weight), output_weight)
    )
    if same:
        return []
    return [f"{HEAD_FILE}: a prediction head other than the base's output layer is not supported"]


def _to(tensor: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device=device, dtype=dtype)
