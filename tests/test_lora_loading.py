"""Loading PEFT LoRA adapters: what is served, and every kind of adapter that must be refused by name."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from multiadapter.base_model import describe_modules
from multiadapter.errors import AdapterLoadError
from multiadapter.lora_config import LoraSpec
from multiadapter.lora_loading import WEIGHTS_FILE, load_lora_adapter
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.peft_factories import build_adapter, build_base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base = build_base("llama", root / "base")
    modules = describe_modules(AutoModelForCausalLM.from_pretrained(base))
    good = build_adapter(base, root / "good", seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, modules, good, root


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The adapter's tensors, copied out of the memory map so the file can be overwritten."""
    return {k: v.clone() for k, v in load_file(directory / WEIGHTS_FILE).items()}


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_good_adapter_loads_with_its_scale_folded(llama):
    _, modules, good, _ = llama
    adapter = load_lora_adapter("good", good, modules)
    assert len(adapter.modules) == 4  # q_proj and v_proj in 2 layers
    weights = load_file(good / WEIGHTS_FILE)
    name = "model.layers.0.self_attn.q_proj"
    raw_b = weights[f"base_model.model.{name}.lora_B.weight"]
    torch.testing.assert_close(adapter.modules[name].b_scaled, raw_b * 2.0)  # alpha 8 / r 4
    assert adapter.version.startswith("sha256:") and len(adapter.version) == 7 + 16


def test_version_changes_with_content(llama, tmp_path):
    _, modules, good, _ = llama
    changed = copy_adapter(good, tmp_path / "changed")
    edit_config(changed, lora_alpha=9)
    assert load_lora_adapter("a", changed, modules).version != load_lora_adapter("a", good, modules).version


def _dora(base, root):
    return build_adapter(base, root / "dora", seed=2, r=4, target_modules=["q_proj"], use_dora=True)


def _modules_to_save(base, root):
    return build_adapter(
        base, root / "mts", seed=3, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )


def _embedding(base, root):
    return build_adapter(base, root / "emb", seed=4, r=4, target_modules=["embed_tokens", "q_proj"])


def _no_match(base, root):
    d = build_adapter(base, root / "nomatch", seed=5, r=4, target_modules=["q_proj"])
    edit_config(d, target_modules=["query_key_value"])
    return d


def _wrong_shapes(base, root):
    other = root / "other_base"
    if not other.exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
            )
        ).save_pretrained(other)
    return build_adapter(other, root / "shapes", seed=6, r=4, target_modules=["q_proj"])


def _nan(base, root):
    d = build_adapter(base, root / "nan", seed=7, r=4, target_modules=["q_proj"])
    weights = read_weights(d)
    key = next(k for k in weights if "lora_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, d / WEIGHTS_FILE)
    return d


def _pickle_only(base, root):
    d = build_adapter(base, root / "pickle", seed=8, r=4, target_modules=["q_proj"])
    torch.save(read_weights(d), d / "adapter_model.bin")
    (d / WEIGHTS_FILE).unlink()
    return d


def _pickle_renamed(base, root):
    d = build_adapter(base, root / "renamed", seed=9, r=4, target_modules=["q_proj"])
    torch.save(read_weights(d), d / WEIGHTS_FILE)
    return d


def _truncated(base, root):
    d = build_adapter(base, root / "trunc", seed=10, r=4, target_modules=["q_proj"])
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return d


def _empty(base, root):
    d = build_adapter(base, root / "empty", seed=11, r=4, target_modules=["q_proj"])
    (d / WEIGHTS_FILE).write_bytes(b"")
    return d


def _bad_json(base, root):
    d = build_adapter(base, root / "badjson", seed=12, r=4, target_modules=["q_proj"])
    (d / "adapter_config.json").write_text("{not json")
    return d


def _unknown_field(base, root):
    d = build_adapter(base, root / "unknown", seed=13, r=4, target_modules=["q_proj"])
    edit_config(d, shiny_new_feature=True)
    return d


def _bias(base, root):
    d = build_adapter(base, root / "bias", seed=14, r=4, target_modules=["q_proj"])
    edit_config(d, bias="all")
    return d


def _extra_tensor(base, root):
    d = build_adapter(base, root / "extra", seed=15, r=4, target_modules=["q_proj"])
    weights = read_weights(d)
    weights["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.ones(4, 96)
    save_file(weights, d / WEIGHTS_FILE)
    return d


def _missing_tensor(base, root):
    d = build_adapter(base, root / "missing", seed=16, r=4, target_modules=["q_proj"])
    edit_config(d, target_modules=["q_proj", "v_proj"])
    return d


def _rank_mismatch(base, root):
    d = build_adapter(base, root / "rank", seed=17, r=4, target_modules=["q_proj"])
    edit_config(d, r=8)
    return d


def _not_lora(base, root):
    d = build_adapter(base, root / "ia3", seed=18, r=4, target_modules=["q_proj"])
    edit_config(d, peft_type="IA3")
    return d


REFUSALS = [
    (_dora, r"use_dora: DoRA is not supported"),
    (_modules_to_save, r"modules_to_save"),
    (_embedding, r"matches model\.embed_tokens \(Embedding\)"),
    (_no_match, r"target_modules \['query_key_value'\] matches no module"),
    (_wrong_shapes, r"do not fit the base"),
    (_nan, r"NaN or infinite"),
    (_pickle_only, r"adapter_model\.bin is a pickle file, which is never loaded; convert it"),
    (_pickle_renamed, r"not a valid safetensors file"),
    (_truncated, r"not a valid safetensors file"),
    (_empty, r"not a valid safetensors file"),
    (_bad_json, r"adapter_config\.json is not valid JSON"),
    (_unknown_field, r"shiny_new_feature: unknown setting"),
    (_bias, r"bias: only 'none' is supported"),
    (_extra_tensor, r"tensor\(s\) the config does not explain"),
    (_missing_tensor, r"weights for model\.layers\.0\.self_attn\.v_proj are missing"),
    (_rank_mismatch, r"expected \(8, 64\)"),
    (_not_lora, r"peft_type: expected 'LORA'"),
]


@pytest.mark.parametrize(("make", "message"), REFUSALS, ids=[f.__name__.strip("_") for f, _ in REFUSALS])
def test_refused_with_a_message_naming_adapter_and_field(llama, make, message):
    base, modules, _, root = llama
    directory = make(base, root)
    with pytest.raises(AdapterLoadError) as info:
        load_lora_adapter("bad-one", directory, modules)
    assert "adapter 'bad-one' refused" in str(info.value)
    assert re.search(message, str(info.value)), str(info.value)


def test_all_linear_written_by_hand_targets_every_linear_layer_but_the_output(llama, tmp_path):
    _, modules, good, _ = llama
    hand = copy_adapter(good, tmp_path / "hand")
    edit_config(hand, target_modules="all-linear")
    with pytest.raises(AdapterLoadError) as info:
        load_lora_adapter("hand", hand, modules)
    missing = [p for p in info.value.problems if "are missing" in p]
    expected = [n for n, m in modules.items() if m.adaptable and not m.is_output_layer]
    assert len(missing) == len(expected) - 4  # all but the 4 q/v weights the file really holds
    assert not any("only Linear" in p for p in info.value.problems)


def test_size_cap(llama):
    _, modules, good, _ = llama
    with pytest.raises(AdapterLoadError, match="over the cap of 100"):
        load_lora_adapter("good", good, modules, max_bytes=100)


TARGET_CONFIGS = [
    dict(target_modules=["q_proj", "v_proj"]),
    dict(target_modules=["self_attn.o_proj", "mlp.down_proj"]),
    dict(target_modules=r".*\.(q|k)_proj"),
    dict(target_modules=["k_proj", "up_proj"], layers_to_transform=[1]),
    dict(target_modules=["k_proj"], layers_to_transform=0, layers_pattern="layers"),
    dict(target_modules=["q_proj", "v_proj"], exclude_modules=["model.layers.0.self_attn.v_proj"]),
    dict(target_modules=r".*proj", exclude_modules=r".*mlp.*"),
]


@pytest.mark.parametrize("raw", TARGET_CONFIGS, ids=range(len(TARGET_CONFIGS)))
def test_target_matching_agrees_with_peft(llama, raw):
    _, modules, _, _ = llama
    peft_config = LoraConfig(r=4, **raw)
    ours = LoraSpec.from_dict("x", {"peft_type": "LORA", "r": 4, **raw})
    for name in modules:
        assert bool(ours.targets(name)) == bool(check_target_module_exists(peft_config, name)), name


def test_rank_and_alpha_patterns_follow_peft(llama):
    spec = LoraSpec.from_dict(
        "x",
        {
            "peft_type": "LORA",
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "down_proj"],
            "rank_pattern": {"down_proj": 16},
            "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 2},
        },
    )
    assert spec.module_params("model.layers.0.mlp.down_proj").rank == 16
    assert spec.module_params("model.layers.0.mlp.down_proj").scale == 8 / 16
    assert spec.module_params("model.layers.1.self_attn.q_proj").scale == 2 / 4
    assert spec.module_params("model.layers.0.self_attn.q_proj").scale == 8 / 4
    rs = LoraSpec.from_dict(
        "x", {"peft_type": "LORA", "r": 16, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"]}
    )
    assert rs.module_params("model.layers.0.self_attn.q_proj").scale == 8 / 4


def test_every_config_problem_is_reported_at_once():
    with pytest.raises(AdapterLoadError) as info:
        LoraSpec.from_dict(
            "x", {"peft_type": "LORA", "r": 0, "lora_alpha": "big", "target_modules": 3, "use_dora": True}
        )
    problems = info.value.problems
    assert any(p.startswith("r:") for p in problems)
    assert any(p.startswith("lora_alpha:") for p in problems)
    assert any(p.startswith("target_modules:") for p in problems)
    assert any(p.startswith("use_dora:") for p in problems)
