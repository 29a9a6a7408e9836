"""The demo base: a small LlamaForCausalLM built from a seed, and loading the saved base and adapters back
with the library that trained them (PEFT or AdapterHub `adapters`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import adapters
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tools.tiny_model import seeded_greedy_llama

ADAPTERHUB_WEIGHTS = "adapter.safetensors"  # what AdapterHub's save_adapter(..., use_safetensors=True) writes


@dataclass(frozen=True)
class BaseShape:
    """Size of the base; the defaults train to the accuracy bar in minutes on two CPU cores."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    # Prompt and answer of MAX_LEN characters plus <bos>, <sep> and <eos> fit with room to spare.
    max_position_embeddings: int = 64


def build_base_model(tokenizer: PreTrainedTokenizerFast, shape: BaseShape, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama over ``tokenizer``'s vocabulary, greedy by default."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return seeded_greedy_llama(config, seed)


def load_demo_model(
    base_dir: Path, adapter_dir: Path | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """A fresh copy of the saved base, with the adapter in ``adapter_dir`` on top if given: AdapterHub's when
    the directory holds its weights file, else PEFT's.

    Every weight, the adapter's included, is cast to ``dtype``, as a server running in ``dtype`` holds them.
    AdapterHub models generate without the KV cache: `adapters` 1.3.0 does not pass transformers 4.57's
    renamed ``past_key_values`` argument on to attention (adapter-hub/adapters#824), so cached decoding
    sees only the newest token. Full forwards are exact, only slower.
    """
    model = LlamaForCausalLM.from_pretrained(base_dir)
    if adapter_dir is not None and (adapter_dir / ADAPTERHUB_WEIGHTS).is_file():
        adapters.init(model)
        model.load_adapter(str(adapter_dir), use_safetensors=True, set_active=True)
        model.generation_config.use_cache = False
    elif adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.to(dtype).eval()
