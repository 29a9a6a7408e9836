"""Attaching a new adapter to the frozen base for training, and saving it, with the library of its kind:
PEFT for LoRA, AdapterHub `adapters` for bottleneck adapters."""

from __future__ import annotations

from pathlib import Path

import adapters
import torch
from peft import get_peft_model
from transformers import LlamaForCausalLM

from training.recipe import AdapterSpec, BottleneckSpec, LoraSpec


def with_trainable_adapter(base: LlamaForCausalLM, spec: AdapterSpec) -> torch.nn.Module:
    """``base`` frozen, with the new adapter of ``spec`` attached and trainable (random init: seed first)."""
    if isinstance(spec, LoraSpec):
        return get_peft_model(base, spec.lora_config())
    adapters.init(base)
    base.add_adapter(spec.adapter_id, config=spec.adapter_config())
    base.train_adapter(spec.adapter_id)  # freezes the base, activates the adapter
    return base


def save_trained_adapter(model: torch.nn.Module, spec: AdapterSpec, out: Path, base_name: str) -> None:
    """Write the adapter of ``spec`` as its library saves it, in safetensors, naming ``base_name`` as base."""
    if isinstance(spec, BottleneckSpec):
        model.config.name_or_path = base_name  # AdapterHub records it as the adapter's model_name
        # The base's own LM head is not part of the adapter: with_head=False keeps it out of the directory.
        model.save_adapter(str(out), spec.adapter_id, with_head=False, use_safetensors=True)
        return
    model.peft_config["default"].base_model_name_or_path = base_name
    # No embedding layer is targeted; saying so also stops PEFT from looking the base up to check.
    model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)
    (out / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
