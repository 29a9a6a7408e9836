"""Loading the frozen base model and describing which of its modules adapters may target."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from .bottleneck import ATTENTION, FFN, BankedBottleneck, BottleneckPlace
from .errors import ConfigError
from .layers import BankedLinear
from .quantization import NONE, QuantizedBase, check_checkpoint, load_quantized

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "gpt2", "mistral", "qwen2", "gpt_neox", "opt", "phi3")


@dataclass(frozen=True)
class ModuleInfo:
    """A module of the base model: its type name and, for adaptable ones, its feature sizes."""

    name: str
    type_name: str
    in_features: int = 0
    out_features: int = 0
    adaptable: bool = False
    is_output_layer: bool = False


def load_base_model(
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    quantization: str = NONE,
    quantization_skip: Sequence[str] = (),
) -> tuple[nn.Module, QuantizedBase]:
    """Load a Hugging Face causal LM directory (weights from safetensors only), frozen, in eval mode, with
    its linear layers quantized at load when `quantization` is nf4 or int8 (quantization.py)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(
            "base model", [f"{path} has no config.json (expected a Hugging Face model directory)"]
        )
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if not list(path.glob("*.safetensors")):
        raise ConfigError(
            "base model", [f"{path} has no *.safetensors weights (pickle weights are not loaded)"]
        )
    check_checkpoint(config)
    if quantization == NONE:
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=dtype, local_files_only=True, use_safetensors=True
        )
        model.to(device)
        quantized = QuantizedBase(NONE, dtype, (), {})
    else:
        model, quantized = load_quantized(path, config, quantization, device, dtype, quantization_skip)
    model.eval()
    model.requires_grad_(False)
    return model, quantized


def describe_modules(model: nn.Module) -> dict[str, ModuleInfo]:
    """Every named module of `model`, marking the Linear / Conv1D ones that LoRA can adapt.

    Call before any layer is wrapped: the result describes the base model as loaded.
    """
    output_layer = model.get_output_embeddings()
    infos: dict[str, ModuleInfo] = {}
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            infos[name] = ModuleInfo(
                name, "Linear", module.in_features, module.out_features, True, module is output_layer
            )
        elif isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            infos[name] = ModuleInfo(name, "Conv1D", int(n_in), int(n_out), True, module is output_layer)
        else:
            infos[name] = ModuleInfo(name, type(module).__name__)
    return infos


def banked_layer(model: nn.Module, name: str, dtype: torch.dtype | None = None) -> BankedLinear:
    """The BankedLinear at `name`, wrapping the base module there on first use (LoRA weights in `dtype`)."""
    module = model.get_submodule(name)
    if isinstance(module, BankedLinear):
        return module
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapped = BankedLinear(module, dtype)
    setattr(parent, child, wrapped)
    return wrapped


@dataclass(frozen=True)
class BottleneckLayout:
    """Where bottleneck adapters attach in one architecture: the decoder layers, and per position the norm
    whose input is the residual stream and the sub-block whose output the residual add takes."""

    model_type: str
    layers_path: str  # also AdapterHub's weight-key prefix of the layers
    hidden_size: int
    num_layers: int
    norm_and_block: dict[str, tuple[str, str]]


_BOTTLENECK_LAYOUTS = {
    "llama": (
        "model.layers",
        {ATTENTION: ("input_layernorm", "self_attn"), FFN: ("post_attention_layernorm", "mlp")},
    ),
    "gpt2": ("transformer.h", {ATTENTION: ("ln_1", "attn"), FFN: ("ln_2", "mlp")}),
}
BOTTLENECK_MODEL_TYPES = tuple(_BOTTLENECK_LAYOUTS)
_SITES_ATTR = "_multiadapter_bottleneck_sites"


def bottleneck_layout(model: nn.Module) -> BottleneckLayout | None:
    """The bottleneck layout of `model`, or None for an architecture without one."""
    model_type = model.config.model_type
    if model_type not in _BOTTLENECK_LAYOUTS:
        return None
    layers_path, norm_and_block = _BOTTLENECK_LAYOUTS[model_type]
    layers = model.get_submodule(layers_path)
    return BottleneckLayout(
        model_type, layers_path, int(model.config.hidden_size), len(layers), norm_and_block
    )


def bottleneck_site(model: nn.Module, place: BottleneckPlace) -> BankedBottleneck:
    """The BankedBottleneck at `place`, attached to the base model on first use (modules are not replaced)."""
    sites = model.__dict__.setdefault(_SITES_ATTR, {})
    site = sites.get(place)
    if site is not None:
        return site
    layout = bottleneck_layout(model)
    if layout is None:
        raise ValueError(f"model type {model.config.model_type!r} has no bottleneck places")
    layer = model.get_submodule(layout.layers_path)[place.layer]
    norm_name, block_name = layout.norm_and_block[place.position]
    norm, block = layer.get_submodule(norm_name), layer.get_submodule(block_name)
    # The first float parameter gives the activations' dtype and device (a quantized block's are integers).
    like = next(p for p in (*norm.parameters(), *block.parameters()) if p.is_floating_point())
    site = BankedBottleneck(place, layout.hidden_size, like)
    site.attach(norm, block)
    sites[place] = site
    return site


def context_window(model: nn.Module) -> int:
    """Maximum number of positions the model was configured for."""
    config = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ConfigError("base model", ["config.json states no context window (max_position_embeddings)"])
