"""AdapterHub bottleneck adapters with random non-zero weights beside PEFT LoRA adapters, for fidelity tests.

AdapterHub zero-initialises the up projection (and `par_bn` more), so an adapter fresh from `add_adapter`
is the identity; every adapter here gets random weights before `save_adapter(..., use_safetensors=True)`.
The AdapterHub model that made them stays in memory as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import adapters
import torch
from adapters import BnConfig, DoubleSeqBnConfig, ParBnConfig, SeqBnConfig
from transformers import AutoModelForCausalLM

from tests.peft_factories import build_adapter, build_base

# id -> AdapterHub config: the three presets, then non-default values of every supported field.
BOTTLENECK_ADAPTERS = {
    "pfeiffer": "seq_bn",
    # the same form as "pfeiffer", wider: rows of both share one group, gathered per row from padded storage
    "pfeiffer_wide": SeqBnConfig(reduction_factor=4),
    "houlsby": "double_seq_bn",
    "parallel": "par_bn",
    "seq_custom": SeqBnConfig(
        reduction_factor={"0": 4, "default": 16},
        non_linearity="gelu",
        residual_before_ln=False,
        ln_after=True,
        scaling="channel",
    ),
    "houlsby_custom": DoubleSeqBnConfig(
        non_linearity="tanh",
        ln_after=True,
        adapter_residual_before_ln=True,
        scaling=0.5,
        leave_out=[0],
    ),
    "par_custom": ParBnConfig(
        reduction_factor=8, ln_after=True, scaling="learned", non_linearity="leakyrelu"
    ),
    "mh_only": BnConfig(
        mh_adapter=True,
        output_adapter=False,
        reduction_factor=2,
        non_linearity="silu",
        original_ln_after=False,
        original_ln_before=True,
    ),
}
LORA_ADAPTERS = {
    "llama": {"lora_q": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])},
    "gpt2": {
        "lora_all": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    },
}


@dataclass
class MixedFamily:
    kind: str
    base_dir: Path
    adapter_dir: Path
    bottleneck_ids: tuple[str, ...]
    lora_ids: tuple[str, ...]
    oracle: torch.nn.Module  # the AdapterHub model holding every bottleneck adapter


def randomize_bottleneck(model: torch.nn.Module, name: str, seed: int) -> None:
    """Random non-zero weights for adapter `name`; scalings and norm weights stay near 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".adapters.{name}." not in key:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith("scaling") or "adapter_norm" in key and key.endswith("weight"):
                param.copy_(1.0 + 0.3 * noise)
            else:
                param.copy_(0.3 * noise)


def build_bottleneck_adapters(base_dir: Path, out: Path, seed: int = 200) -> torch.nn.Module:
    """Every adapter of BOTTLENECK_ADAPTERS, saved under `out`; returns the AdapterHub model (eval)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    adapters.init(model)
    out.mkdir(parents=True, exist_ok=True)
    for i, (adapter_id, config) in enumerate(BOTTLENECK_ADAPTERS.items()):
        model.add_adapter(adapter_id, config=config)
        randomize_bottleneck(model, adapter_id, seed + i)
        model.save_adapter(str(out / adapter_id), adapter_id, use_safetensors=True)
    return model.eval()


def build_mixed_family(kind: str, root: Path) -> MixedFamily:
    base_dir = build_base(kind, root / "base")
    oracle = build_bottleneck_adapters(base_dir, root / "adapters")
    for i, (adapter_id, spec) in enumerate(LORA_ADAPTERS[kind].items()):
        build_adapter(base_dir, root / "adapters" / adapter_id, seed=300 + i, **spec)
    return MixedFamily(
        kind, base_dir, root / "adapters", tuple(BOTTLENECK_ADAPTERS), tuple(LORA_ADAPTERS[kind]), oracle
    )


def lora_reference_model(family: MixedFamily) -> torch.nn.Module:
    """PEFT over the family's base holding every LoRA adapter of the family, in eval mode (the oracle for
    LoRA rows; `adapter_names=[...]` picks each row's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(family.base_dir)
    first, *rest = family.lora_ids
    model = PeftModel.from_pretrained(base, family.adapter_dir / first, adapter_name=first)
    for adapter_id in rest:
        model.load_adapter(family.adapter_dir / adapter_id, adapter_name=adapter_id)
    return model.eval()
