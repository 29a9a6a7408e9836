"""A small Llama saved in bf16 and PEFT LoRA adapters made over its quantized (NF4 / int8) load, for the
quantized-base tests and benchmark. Dimensions are multiples of 64, which every bitsandbytes CPU and CUDA
kernel takes (AVX512-BF16 CPUs repack NF4 weights in blocks of 32 x 64)."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

# The byte-level tokenizer of tools.tiny_model (ids 0-3 special, byte b is id 4 + b), so the model serves
# text; 260 is no layer width, so the float embedding and head never look like a linear layer's weight.
VOCAB = 260
EOS, BOS, PAD, SEP = 2, 1, 0, 3
# The model counts through the lowercase letters (ids of bytes a-z), wrapping.
LETTERS = range(4 + ord("a"), 4 + ord("z") + 1)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

QUANTIZED_ADAPTERS = {
    "q2": dict(r=2, lora_alpha=4, target_modules=["q_proj"]),
    "all16": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR),
    "mlp8": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"]),
}
TRAINED = "qlora"  # trained a few steps over the quantized base with prepare_model_for_kbit_training
TRAINED_SPEC = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])


@dataclass(frozen=True)
class QuantizedFamily:
    method: str
    base_dir: Path
    adapter_dir: Path
    adapter_ids: tuple[str, ...]


def bnb_config(method: str) -> BitsAndBytesConfig:
    """The quantization the engine applies for `method` (multiadapter.quantization), built here by hand."""
    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)


def load_quantized(base_dir: Path, method: str, device: str = "cpu") -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=bnb_config(method), device_map={"": device}, dtype=torch.bfloat16
    )


def task_batch(step: int, rows: int = 32, length: int = 16) -> torch.Tensor:
    """Token sequences counting by `step` through the letters (wrapping) from random starts, framed as the
    tokenizer frames a prompt: BOS first, and SEP after a random number of letters (the count goes on after
    it, as an answer goes on from its prompt)."""
    span = len(LETTERS)
    start = torch.randint(0, span, (rows, 1))
    letters = LETTERS[0] + (start + step * torch.arange(length)[None]) % span
    cut = int(torch.randint(1, length - 1, ()))
    bos, sep = torch.full((rows, 1), BOS), torch.full((rows, 1), SEP)
    return torch.cat([bos, letters[:, :cut], sep, letters[:, cut:]], dim=1)


def random_prompts(count: int, seed: int, lengths: tuple[int, int] = (3, 12)) -> list[list[int]]:
    """Prompts as the tokenizer makes them from random lowercase text: BOS, letters, SEP."""
    rng = random.Random(seed)
    return [[BOS, *(rng.choice(LETTERS) for _ in range(rng.randint(*lengths))), SEP] for _ in range(count)]


def train(model: torch.nn.Module, step: int, steps: int, lr: float) -> None:
    """A few AdamW steps of next-token loss on `task_batch(step)`: confident greedy answers (wide margins
    between the first and second token), so bf16 rounding rarely decides them."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        tokens = task_batch(step)
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_base(out: Path, seed: int = 0) -> Path:
    """A small Llama trained to count by one (150 steps, a few seconds), saved in bf16 with its tokenizer."""
    from tools.tiny_model import build_tokenizer

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=EOS,
        bos_token_id=BOS,
        pad_token_id=PAD,
    )
    model = LlamaForCausalLM(config)
    train(model, step=1, steps=150, lr=1e-2)
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    return out


def build_adapters(base_dir: Path, out: Path, method: str, seed: int = 300) -> tuple[str, ...]:
    """PEFT LoRA adapters over the `method` load of the base: three of several ranks and targets from random
    non-zero weights, each trained a few steps to count by its own step (3, 4, 5; random weights alone leave
    greedy answers to rounding), and one trained as QLoRA is (prepare_model_for_kbit_training, then AdamW)
    to count by two."""
    for i, (adapter_id, spec) in enumerate(QUANTIZED_ADAPTERS.items()):
        torch.manual_seed(seed + i)
        model = get_peft_model(load_quantized(base_dir, method), LoraConfig(init_lora_weights=False, **spec))
        train(model, step=3 + i, steps=20, lr=1e-2)
        model.save_pretrained(out / adapter_id, safe_serialization=True)
    torch.manual_seed(seed + 99)
    base = prepare_model_for_kbit_training(load_quantized(base_dir, method), use_gradient_checkpointing=False)
    model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **TRAINED_SPEC))
    train(model, step=2, steps=30, lr=1e-2)
    model.save_pretrained(out / TRAINED, safe_serialization=True)
    return (*QUANTIZED_ADAPTERS, TRAINED)


def build_quantized_family(root: Path, method: str) -> QuantizedFamily:
    base_dir = root / "base"
    if not (base_dir / "config.json").is_file():
        build_base(base_dir)
    ids = build_adapters(base_dir, root / f"adapters_{method}", method)
    return QuantizedFamily(method, base_dir, root / f"adapters_{method}", ids)


def peft_over_quantized(family: QuantizedFamily, device: str = "cpu") -> PeftModel:
    """PEFT over the same quantized load with every adapter of the family (eval; adapter_names batches)."""
    base = load_quantized(family.base_dir, family.method, device)
    first, *rest = family.adapter_ids
    model = PeftModel.from_pretrained(base, family.adapter_dir / first, adapter_name=first)
    for adapter_id in rest:
        model.load_adapter(family.adapter_dir / adapter_id, adapter_name=adapter_id)
    return model.eval()


BOTTLENECKS = {"bn_seq": "seq_bn", "bn_par": "par_bn"}


def build_bottleneck_adapters(base_dir: Path, out: Path, seed: int = 200) -> tuple[str, ...]:
    """AdapterHub bottleneck adapters (sequential and parallel) with random non-zero weights, made on the
    float32 load of the base (AdapterHub adapters are not trained over a quantized base)."""
    import adapters

    from tests.adapterhub_factories import randomize_bottleneck

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapters.init(model)
    out.mkdir(parents=True, exist_ok=True)
    for i, (adapter_id, config) in enumerate(BOTTLENECKS.items()):
        model.add_adapter(adapter_id, config=config)
        randomize_bottleneck(model, adapter_id, seed + i)
        model.save_adapter(str(out / adapter_id), adapter_id, use_safetensors=True)
    return tuple(BOTTLENECKS)


def adapterhub_over_quantized(base_dir: Path, method: str, adapter_dir: Path, ids) -> torch.nn.Module:
    """AdapterHub over the `method` load of the base with the bottleneck adapters `ids`, their weights cast
    to the activations' bf16 (AdapterHub loads them in float32, which its layers cannot mix with bf16)."""
    import adapters

    model = load_quantized(base_dir, method)
    adapters.init(model)
    for adapter_id in ids:
        model.load_adapter(str(adapter_dir / adapter_id), load_as=adapter_id, use_safetensors=True)
    for name, param in model.named_parameters():
        if ".adapters." in name:
            param.data = param.data.to(torch.bfloat16)
    return model.eval()
