"""The tiny model builder: byte tokenizer, base model, and three distinct PEFT LoRA adapters."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from server.config import PROJECT_ROOT
from tools import tiny_model
from tools.tiny_model import (
    STAMP_NAME,
    AdaptersIndistinctError,
    TinyModelPaths,
    build_tiny,
    check_adapters_distinct,
)

BYTE_OFFSET = 4
TEXTS = [
    "hello world",
    "",
    "  two  spaces and\ttab\n",
    "naïve café",
    "日本語のテキスト",
    "emoji 🙂👍🏽",
]


@pytest.fixture(scope="module")
def tiny() -> TinyModelPaths:
    """The default build (seed 0), shared with `make serve` and reused when up to date."""
    return build_tiny(PROJECT_ROOT / "build" / "tiny", seed=0)


@pytest.fixture(scope="module")
def tokenizer(tiny: TinyModelPaths) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(tiny.base_model)


def load_adapter(tiny: TinyModelPaths, adapter_id: str) -> PeftModel:
    base = LlamaForCausalLM.from_pretrained(tiny.base_model)
    return PeftModel.from_pretrained(base, tiny.adapter_dir / adapter_id).eval()


def adapter_weights(tiny: TinyModelPaths, adapter_id: str) -> dict[str, torch.Tensor]:
    return load_file(tiny.adapter_dir / adapter_id / "adapter_model.safetensors")


# --- tokenizer -------------------------------------------------------------------------------------------


def test_special_tokens_and_vocabulary(tokenizer: PreTrainedTokenizerFast) -> None:
    assert len(tokenizer) == 4 + 256
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<pad>", "<bos>", "<eos>", "<sep>")}
    assert ids == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<sep>": 3}
    assert (
        tokenizer.pad_token_id,
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.sep_token_id,
    ) == (
        0,
        1,
        2,
        3,
    )


def test_template_wraps_text_in_bos_and_sep(tokenizer: PreTrainedTokenizerFast) -> None:
    encoded = tokenizer("hi")
    assert encoded.input_ids == [1, BYTE_OFFSET + ord("h"), BYTE_OFFSET + ord("i"), 3]
    assert set(encoded) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("text", TEXTS)
def test_every_utf8_byte_is_one_token_and_round_trips(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text).input_ids
    assert ids == [1, *(BYTE_OFFSET + byte for byte in text.encode("utf-8")), 3]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_all_ascii_bytes_map_in_order(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "".join(chr(code) for code in range(128))
    assert tokenizer(text).input_ids[1:-1] == [BYTE_OFFSET + code for code in range(128)]


def test_batches_pad_on_the_left(tokenizer: PreTrainedTokenizerFast) -> None:
    batch = tokenizer(["a", "abc"], padding=True)
    assert batch.input_ids[0][:2] == [0, 0]
    assert batch.attention_mask[0] == [0, 0, 1, 1, 1]


# --- base model ------------------------------------------------------------------------------------------


def test_base_model_shape_and_files(tiny: TinyModelPaths) -> None:
    config = LlamaConfig.from_pretrained(tiny.base_model)
    shape = (
        config.hidden_size,
        config.num_hidden_layers,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.intermediate_size,
    )
    assert shape == (64, 2, 4, 2, 128)
    assert (config.vocab_size, config.max_position_embeddings) == (260, 256)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 1, 2)
    assert (tiny.base_model / "model.safetensors").is_file()
    assert not list(tiny.base_model.glob("*.bin"))


# --- adapters --------------------------------------------------------------------------------------------


def test_adapter_files(tiny: TinyModelPaths) -> None:
    assert tiny.adapter_ids == ("alpha", "beta", "gamma")
    for adapter_id in tiny.adapter_ids:
        files = {path.name for path in (tiny.adapter_dir / adapter_id).iterdir()}
        assert files == {"adapter_config.json", "adapter_model.safetensors"}


@pytest.mark.parametrize(
    ("adapter_id", "rank", "alpha", "rslora", "targets"),
    [
        ("alpha", 4, 8, False, {"q_proj", "v_proj"}),
        ("beta", 8, 16, True, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gamma", 2, 4, False, r".*\.mlp\.(gate_proj|up_proj|down_proj)"),
    ],
)
def test_adapter_configs(
    tiny: TinyModelPaths, adapter_id: str, rank: int, alpha: int, rslora: bool, targets: object
) -> None:
    config = LoraConfig.from_pretrained(tiny.adapter_dir / adapter_id)
    assert (config.r, config.lora_alpha, config.use_rslora) == (rank, alpha, rslora)
    assert config.target_modules == targets


@pytest.mark.parametrize(
    ("adapter_id", "modules"),
    [
        ("alpha", {"q_proj", "v_proj"}),
        ("beta", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
        ("gamma", {"gate_proj", "up_proj", "down_proj"}),
    ],
)
def test_adapter_weights_cover_targets_and_are_nonzero(
    tiny: TinyModelPaths, adapter_id: str, modules: set[str]
) -> None:
    weights = adapter_weights(tiny, adapter_id)
    assert {name.split(".")[-3] for name in weights} == modules
    assert len(weights) == 2 * 2 * len(modules)  # lora_A and lora_B, in each of the two layers
    assert all(tensor.abs().max() > 0 for tensor in weights.values())


def test_adapters_change_logits_relative_to_base_and_each_other(
    tiny: TinyModelPaths, tokenizer: PreTrainedTokenizerFast
) -> None:
    inputs = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.no_grad():
        logits = {"<base>": LlamaForCausalLM.from_pretrained(tiny.base_model)(**inputs).logits}
        for adapter_id in tiny.adapter_ids:
            logits[adapter_id] = load_adapter(tiny, adapter_id)(**inputs).logits
    for first, second in itertools.combinations(logits, 2):
        gap = (logits[first] - logits[second]).abs().max().item()
        assert gap > 0.5, f"{first} vs {second}: logits differ by only {gap}"


def test_greedy_continuations_all_differ(tiny: TinyModelPaths) -> None:
    check_adapters_distinct(tiny, prompts=("hello", "abc", "naïve café"))


# --- the builder -----------------------------------------------------------------------------------------


def test_rebuild_is_skipped_when_up_to_date(tiny: TinyModelPaths) -> None:
    watched = [tiny.root / STAMP_NAME, tiny.base_model / "model.safetensors"]
    before = [path.stat().st_mtime_ns for path in watched]
    assert build_tiny(tiny.root, seed=0) == tiny
    assert [path.stat().st_mtime_ns for path in watched] == before


def test_same_seed_same_weights_other_seed_rebuilds(tiny: TinyModelPaths, tmp_path: Path) -> None:
    copy = build_tiny(tmp_path, seed=0)
    for adapter_id in tiny.adapter_ids:
        expected = adapter_weights(tiny, adapter_id)
        assert all(
            torch.equal(tensor, expected[name]) for name, tensor in adapter_weights(copy, adapter_id).items()
        )

    reseeded = build_tiny(tmp_path, seed=1)
    assert json.loads((tmp_path / STAMP_NAME).read_text())["seed"] == 1
    alpha_seed0, alpha_seed1 = adapter_weights(tiny, "alpha"), adapter_weights(reseeded, "alpha")
    assert not all(torch.equal(alpha_seed1[name], tensor) for name, tensor in alpha_seed0.items())


def test_builder_refuses_adapters_that_do_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_model, "LORA_B_GAIN", 0.0)  # every adapter becomes the identity
    with pytest.raises(AdaptersIndistinctError, match="<base> and alpha both continue"):
        build_tiny(tmp_path / "identity")
    assert not (tmp_path / "identity" / STAMP_NAME).exists()
    assert tiny_model.main(["--out", str(tmp_path / "identity-cli")]) == 1
