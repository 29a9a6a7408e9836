"""Random small base models and PEFT-made LoRA adapters with non-zero weights, for fidelity tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 96
EOS, BOS, PAD = 2, 1, 0

LLAMA_ADAPTERS = {
    # rank 1 on one projection
    "q1": dict(r=1, lora_alpha=2, target_modules=["q_proj"]),
    # rank 64, rsLoRA, every linear layer
    "all64": dict(
        r=64,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
    # regex targets with rank / alpha patterns
    "mlp_pat": dict(
        r=4,
        lora_alpha=8,
        target_modules=r".*\.mlp\.(up|down|gate)_proj",
        rank_pattern={"down_proj": 12},
        alpha_pattern={"up_proj": 3.0},
    ),
    # one layer only, through layers_to_transform
    "kv_l1": dict(r=8, lora_alpha=32, target_modules=["k_proj", "v_proj", "o_proj"], layers_to_transform=[1]),
}

GPT2_ADAPTERS = {
    "attn2": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
    "all16rs": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
    ),
    "alllin3": dict(r=3, lora_alpha=6, target_modules="all-linear"),
    "mlp32_l0": dict(
        r=32, lora_alpha=16, target_modules=["mlp.c_proj"], fan_in_fan_out=True, layers_to_transform=[0]
    ),
}


@dataclass(frozen=True)
class Family:
    name: str
    base_dir: Path
    adapter_dir: Path
    adapter_ids: tuple[str, ...]


def build_base(kind: str, out: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            eos_token_id=EOS,
            bos_token_id=BOS,
            pad_token_id=PAD,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            eos_token_id=EOS,
            bos_token_id=BOS,
        )
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def build_adapter(base_dir: Path, out: Path, seed: int, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter with random non-zero A and B (init_lora_weights=False), saved as safetensors."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(4.0)  # make each adapter's effect on greedy decoding unmistakable
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def build_family(kind: str, root: Path) -> Family:
    specs = LLAMA_ADAPTERS if kind == "llama" else GPT2_ADAPTERS
    base_dir = build_base(kind, root / "base")
    for i, (adapter_id, spec) in enumerate(specs.items()):
        build_adapter(base_dir, root / "adapters" / adapter_id, seed=100 + i, **spec)
    return Family(kind, base_dir, root / "adapters", tuple(specs))


def peft_reference(family: Family) -> PeftModel:
    """All of the family's adapters loaded into one PEFT model, eval mode, for adapter_names batches."""
    base = AutoModelForCausalLM.from_pretrained(family.base_dir)
    first, *rest = family.adapter_ids
    model = PeftModel.from_pretrained(base, family.adapter_dir / first, adapter_name=first)
    for adapter_id in rest:
        model.load_adapter(family.adapter_dir / adapter_id, adapter_name=adapter_id)
    return model.eval()


def peft_logits(reference: PeftModel, batch, adapter_ids, device="cpu") -> torch.Tensor:
    """PEFT's logits [B, T, V] (float32) for `batch` (the engine's padded batch: input_ids, attention_mask,
    position_ids), row i on adapter_ids[i] ("" is the base), in one mixed-adapter forward."""
    with torch.no_grad():
        return reference(
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            position_ids=batch.position_ids.to(device),
            adapter_names=[a or "__base__" for a in adapter_ids],
        ).logits.to(torch.float32)
