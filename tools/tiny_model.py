"""Build the tiny default model: a byte-level tokenizer, a random Llama and three PEFT LoRA adapters.

``python -m tools.tiny_model --out build/tiny [--seed 0]`` writes::

    <out>/base/                      LlamaForCausalLM (safetensors) + tokenizer + generation_config
    <out>/adapters/<id>/             adapter_config.json + adapter_model.safetensors, id in ADAPTER_SPECS
    <out>/tiny_model.json            stamp: builder version + seed, written last

Everything is random but seeded, so the same seed gives the same weights. The adapters are deliberately
strong: the builder checks that each one changes the greedy continuation of a few prompts, relative to the
base and to every other adapter, so tests built on them cannot pass with an adapter that does nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

from tools.build_cache import locked, read_stamp, seeded

LOG = logging.getLogger(__name__)

# Bump whenever the output changes, so stale builds are rebuilt instead of reused.
BUILDER_VERSION = 1
STAMP_NAME = "tiny_model.json"

PAD, BOS, EOS, SEP = "<pad>", "<bos>", "<eos>", "<sep>"
SPECIAL_TOKENS = (PAD, BOS, EOS, SEP)  # ids 0..3; byte b has id len(SPECIAL_TOKENS) + b
BYTE_OFFSET = len(SPECIAL_TOKENS)

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Adapter id -> LoRA hyper-parameters. Three different shapes of config on purpose: a list of
# attention targets, rsLoRA over every linear layer, and a regex string over the MLP.
ADAPTER_SPECS: dict[str, dict[str, object]] = {
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {
        "r": 8,
        "lora_alpha": 16,
        "use_rslora": True,
        "target_modules": [*ATTENTION_PROJECTIONS, *MLP_PROJECTIONS],
    },
    "gamma": {"r": 2, "lora_alpha": 4, "target_modules": r".*\.mlp\.(gate_proj|up_proj|down_proj)"},
}

# lora_B is multiplied by this after PEFT's random init, so every adapter moves the greedy output.
LORA_B_GAIN = 4.0

CHECK_PROMPTS = ("hello", "The quick brown fox")
CHECK_NEW_TOKENS = 12


@dataclass(frozen=True)
class TinyModelPaths:
    """Where a built tiny model lives."""

    root: Path
    base_model: Path
    adapter_dir: Path
    adapter_ids: tuple[str, ...]


class AdaptersIndistinctError(RuntimeError):
    """Two of base + adapters produce the same greedy continuation of a check prompt."""


def paths_for(out_dir: Path) -> TinyModelPaths:
    """The layout under ``out_dir`` (whether or not it is built yet)."""
    root = out_dir.resolve()
    return TinyModelPaths(
        root=root,
        base_model=root / "base",
        adapter_dir=root / "adapters",
        adapter_ids=tuple(ADAPTER_SPECS),
    )


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 4 special tokens, then exactly one token per byte (260 in all).

    ``tok(text).input_ids == [BOS, *(BYTE_OFFSET + b for b in text.encode()), SEP]``.
    """
    byte_to_char = bytes_to_unicode()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({byte_to_char[b]: BYTE_OFFSET + b for b in range(256)})
    # BPE without merges: the ByteLevel pre-tokenizer maps each byte to one character, and each
    # character is its own token.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {SEP}",
        pair=f"{BOS} $A {SEP} $B:1 {EOS}:1",
        special_tokens=[(token, vocab[token]) for token in (BOS, SEP, EOS)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        sep_token=SEP,
        model_max_length=256,
        model_input_names=["input_ids", "attention_mask"],  # Llama takes no token_type_ids
        padding_side="left",  # decoder-only generation pads on the left
    )


def build_base_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    """A seeded, randomly initialised 2-layer Llama (hidden 64, 4 heads, 2 KV heads)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,  # larger than Llama's 0.02: clear logit margins for greedy decoding
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        tie_word_embeddings=False,
    )
    return seeded_greedy_llama(config, seed).eval()


def seeded_greedy_llama(config: LlamaConfig, seed: int) -> LlamaForCausalLM:
    """A LlamaForCausalLM initialised from ``seed`` whose generation defaults are greedy, with the config's
    bos / eos / pad ids."""
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    return model


def build_adapter(base_model_dir: Path, adapter_id: str, seed: int) -> PeftModel:
    """A PEFT LoRA adapter with random, amplified weights on a fresh copy of the saved base."""
    base = LlamaForCausalLM.from_pretrained(base_model_dir)
    config = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **ADAPTER_SPECS[adapter_id])
    with seeded(seed):
        model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.mul_(LORA_B_GAIN)
    return model.eval()


def greedy_continuation(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompt: str) -> list[int]:
    """Token ids greedily generated after ``prompt`` (at most CHECK_NEW_TOKENS)."""
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False)
    return output[0, inputs.input_ids.shape[1] :].tolist()


def check_adapters_distinct(paths: TinyModelPaths, prompts: Sequence[str] = CHECK_PROMPTS) -> None:
    """Reload everything from disk; raise AdaptersIndistinctError unless base and adapters all differ."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(paths.base_model)
    outputs: dict[str, dict[str, list[int]]] = {prompt: {} for prompt in prompts}
    base = LlamaForCausalLM.from_pretrained(paths.base_model).eval()
    for prompt in prompts:
        outputs[prompt]["<base>"] = greedy_continuation(base, tokenizer, prompt)
    for adapter_id in paths.adapter_ids:
        fresh_base = LlamaForCausalLM.from_pretrained(paths.base_model)
        model = PeftModel.from_pretrained(fresh_base, paths.adapter_dir / adapter_id).eval()
        for prompt in prompts:
            outputs[prompt][adapter_id] = greedy_continuation(model, tokenizer, prompt)

    clashes = [
        f"{first} and {second} both continue {prompt!r} with {by_model[first]}"
        for prompt, by_model in outputs.items()
        for first, second in itertools.combinations(by_model, 2)
        if by_model[first] == by_model[second]
    ]
    if clashes:
        raise AdaptersIndistinctError("; ".join(clashes))


def build_tiny(out_dir: Path, seed: int = 0) -> TinyModelPaths:
    """Build the tiny base model and adapters under ``out_dir``, or reuse an up-to-date build.

    Idempotent: a build whose stamp holds this BUILDER_VERSION and ``seed`` is reused as is; anything
    else under ``base/`` and ``adapters/`` is replaced. Concurrent callers are serialised by a lock file.
    """
    paths = paths_for(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    with locked(paths.root / ".lock"):
        if read_stamp(paths.root / STAMP_NAME) == _stamp(seed):
            LOG.info("tiny model up to date in %s", paths.root)
            return paths
        _build_into(paths, seed)
        check_adapters_distinct(paths)
        (paths.root / STAMP_NAME).write_text(json.dumps(_stamp(seed), indent=2) + "\n")
    LOG.info("built tiny model in %s", paths.root)
    return paths


def _build_into(paths: TinyModelPaths, seed: int) -> None:
    (paths.root / STAMP_NAME).unlink(missing_ok=True)
    for stale in (paths.base_model, paths.adapter_dir):
        shutil.rmtree(stale, ignore_errors=True)

    tokenizer = build_tokenizer()
    _check_round_trip(tokenizer)
    model = build_base_model(len(tokenizer), seed)
    model.save_pretrained(paths.base_model, safe_serialization=True)
    tokenizer.save_pretrained(paths.base_model)

    for offset, adapter_id in enumerate(paths.adapter_ids, start=1):
        adapter = build_adapter(paths.base_model, adapter_id, seed=seed * 1000 + offset)
        adapter_path = paths.adapter_dir / adapter_id
        adapter.save_pretrained(adapter_path, safe_serialization=True)
        (adapter_path / "README.md").unlink(missing_ok=True)  # PEFT's empty model card


def _check_round_trip(tokenizer: PreTrainedTokenizerFast) -> None:
    for text in ("hello world", "  leading spaces", "héllo wörld ✓ 你好 🙂"):
        ids = tokenizer(text).input_ids
        decoded = tokenizer.decode(ids, skip_special_tokens=True)
        if decoded != text or len(ids) != len(text.encode()) + 2:
            raise RuntimeError(f"byte tokenizer does not round-trip {text!r}: {ids} -> {decoded!r}")


def _stamp(seed: int) -> dict[str, int]:
    return {"builder_version": BUILDER_VERSION, "seed": seed}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/tiny"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed for the model and adapter weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = build_tiny(args.out, seed=args.seed)
    except AdaptersIndistinctError as exc:
        LOG.error("adapters are not distinct enough: %s", exc)
        return 1
    LOG.info("base model: %s", paths.base_model)
    LOG.info("adapters:   %s (%s)", paths.adapter_dir, ", ".join(paths.adapter_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
