"""Loading AdapterHub bottleneck adapters: the spec, format detection, the converter, every refusal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from multiadapter.adapter_format import BOTTLENECK, LORA, adapter_format
from multiadapter.base_model import bottleneck_layout
from multiadapter.bottleneck import ATTENTION, FFN, BottleneckPlace
from multiadapter.bottleneck_config import BottleneckSpec
from multiadapter.bottleneck_loading import WEIGHTS_FILE, load_bottleneck_adapter
from multiadapter.convert import ConversionError, convert_directory, main
from multiadapter.errors import AdapterLoadError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.adapterhub_factories import build_bottleneck_adapters
from tests.peft_factories import build_adapter, build_base


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("bn_llama")
    base = build_base("llama", root / "base")
    model = AutoModelForCausalLM.from_pretrained(base)
    build_bottleneck_adapters(base, root / "adapters")
    lora = build_adapter(base, root / "lora", seed=1, r=2, lora_alpha=4, target_modules=["q_proj"])
    return base, model, root / "adapters", lora


def load(model, directory, adapter_id="a"):
    output = model.get_output_embeddings().weight
    return load_bottleneck_adapter(adapter_id, directory, bottleneck_layout(model), output_weight=output)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(directory: Path, **changes) -> None:
    path = directory / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw["config"].update(changes)
    path.write_text(json.dumps(raw))


def edit_weights(directory: Path, change) -> None:
    tensors = {k: v.clone() for k, v in load_file(directory / WEIGHTS_FILE).items()}
    change(tensors)
    save_file(tensors, directory / WEIGHTS_FILE)


def first_key(tensors, fragment):
    return next(k for k in sorted(tensors) if fragment in k)


def test_presets_place_adapters_where_adapterhub_does(llama):
    _, model, adapters, _ = llama
    places = {
        a: set(load(model, adapters / a).places) for a in ("pfeiffer", "houlsby", "parallel", "mh_only")
    }
    assert places["pfeiffer"] == {BottleneckPlace(i, FFN) for i in range(2)}
    assert places["parallel"] == {BottleneckPlace(i, FFN) for i in range(2)}
    assert places["houlsby"] == {BottleneckPlace(i, p) for i in range(2) for p in (ATTENTION, FFN)}
    assert places["mh_only"] == {BottleneckPlace(i, ATTENTION) for i in range(2)}
    custom = load(model, adapters / "houlsby_custom").places  # leave_out=[0]
    assert {p.layer for p in custom} == {1}
    widths = {p.layer: w.size for p, w in load(model, adapters / "seq_custom").places.items()}
    assert widths == {0: 16, 1: 4}  # reduction_factor {"0": 4, "default": 16} of hidden 64


def test_scaling_is_folded_into_the_up_projection(llama):
    _, model, adapters, _ = llama
    raw = load_file(adapters / "houlsby_custom" / WEIGHTS_FILE)  # scaling 0.5
    weights = load(model, adapters / "houlsby_custom").places[BottleneckPlace(1, FFN)]
    key = "model.layers.1.output_adapters.adapters.houlsby_custom.adapter_up"
    torch.testing.assert_close(weights.up_scaled, raw[key + ".weight"] * 0.5)
    torch.testing.assert_close(weights.up_bias_scaled, raw[key + ".bias"] * 0.5)


def test_version_is_a_content_hash(llama, tmp_path):
    _, model, adapters, _ = llama
    changed = copy(adapters / "pfeiffer", tmp_path / "changed")
    edit_weights(changed, lambda t: t[first_key(t, "adapter_up.bias")].add_(1.0))
    assert load(model, changed).version != load(model, adapters / "pfeiffer").version
    assert load(model, adapters / "pfeiffer").version.startswith("sha256:")


def test_presets_by_name_only_override_bnconfig_defaults():
    meta = {"name": "x", "model_type": "llama", "hidden_size": 64}
    spec = BottleneckSpec.from_dict("x", {**meta, "config": "par_bn"})
    assert (spec.is_parallel, spec.scaling, spec.reduction_factor, spec.mh_adapter) == (True, 4.0, 2.0, False)
    assert spec.original_ln_after and not spec.original_ln_before
    houlsby = BottleneckSpec.from_dict("x", {**meta, "config": "houlsby"})
    assert houlsby.mh_adapter and houlsby.output_adapter and houlsby.non_linearity == "swish"


def _mutate_config(**changes):
    def make(src, dst):
        edit_config(copy(src / "pfeiffer", dst), **changes)
        return dst

    return make


def _top_level(**changes):
    def make(src, dst):
        copy(src / "pfeiffer", dst)
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return dst

    return make


def _pickle_only(src, dst):
    copy(src / "pfeiffer", dst)
    tensors = load_file(dst / WEIGHTS_FILE)
    torch.save(tensors, dst / "pytorch_adapter.bin")
    (dst / WEIGHTS_FILE).unlink()
    return dst


def _weights(change, adapter="pfeiffer"):
    def make(src, dst):
        edit_weights(copy(src / adapter, dst), change)
        return dst

    return make


def _wrong_shape(t):
    key = first_key(t, "adapter_down.0.weight")
    t[key] = torch.zeros(t[key].shape[0] + 1, t[key].shape[1])


def _nan(t):
    t[first_key(t, "adapter_up.weight")][0, 0] = float("nan")


def _missing(t):
    del t[first_key(t, "adapter_up.bias")]


def _extra(t):
    t["model.layers.0.attention_adapters.adapters.pfeiffer.adapter_up.bias"] = torch.zeros(64)


def _int_weights(t):
    key = first_key(t, "adapter_down.0.bias")
    t[key] = t[key].to(torch.int64)


def _bad_json(src, dst):
    copy(src / "pfeiffer", dst)
    (dst / "adapter_config.json").write_text("{not json")
    return dst


def _other_head(src, dst):
    copy(src / "pfeiffer", dst)
    head = {k: v.clone() + 1.0 for k, v in load_file(dst / "model_head.safetensors").items()}
    save_file(head, dst / "model_head.safetensors")
    return dst


def _not_safetensors(src, dst):
    copy(src / "pfeiffer", dst)
    (dst / WEIGHTS_FILE).write_bytes(b"\x00" * 16)
    return dst


REFUSALS = [
    (_mutate_config(use_gating=True), r"use_gating: gating"),
    (_mutate_config(phm_layer=True), r"phm_layer: PHM"),
    (_mutate_config(inv_adapter="nice"), r"inv_adapter: invertible"),
    (_mutate_config(cross_adapter=True), r"cross_adapter"),
    (_mutate_config(ln_before=True), r"ln_before: a new layer norm"),
    (_mutate_config(residual_before_ln="post_add"), r"residual_before_ln: 'post_add'"),
    (_mutate_config(scaling="cubic"), r"scaling: expected a number"),
    (_mutate_config(non_linearity="wiggle"), r"non_linearity: unknown activation 'wiggle'"),
    (_mutate_config(reduction_factor=0), r"reduction_factor: expected a positive number"),
    (_mutate_config(reduction_factor={"1": 8}), r"reduction_factor: no value for layer 0"),
    (_mutate_config(leave_out=[7]), r"leave_out: layers \[7\] do not exist"),
    (_mutate_config(mh_adapter=False, output_adapter=False), r"both false"),
    (_mutate_config(brand_new_switch=True), r"brand_new_switch: unknown setting"),
    (_mutate_config(original_ln_after="yes"), r"original_ln_after: expected true or false"),
    (_top_level(config="compacter"), r"preset 'compacter' is not supported"),
    (_top_level(config="not_a_preset"), r"unknown preset 'not_a_preset'"),
    (_top_level(config={"architecture": "lora", "r": 8}), r"architecture: only bottleneck"),
    (_top_level(model_type="gpt2"), r"model_type: the adapter is for 'gpt2', the base is 'llama'"),
    (_top_level(hidden_size=128), r"hidden_size: the adapter is for 128"),
    (_bad_json, r"adapter_config.json is not valid JSON"),
    (_pickle_only, r"pytorch_adapter.bin is a pickle file.*python -m multiadapter.convert"),
    (_weights(_wrong_shape), r"shape \(5, 64\) does not fit the base \(expected \(4, 64\)\)"),
    (_weights(_nan), r"NaN or infinite"),
    (
        _weights(_missing),
        r"weights are missing: model.layers.0.output_adapters.adapters.pfeiffer.adapter_up.bias",
    ),
    (_weights(_extra), r"1 tensor\(s\) the config does not explain"),
    (_weights(_int_weights), r"must be floating point"),
    (_other_head, r"model_head.safetensors: a prediction head other than the base's"),
    (_not_safetensors, r"adapter.safetensors is not a valid safetensors file"),
]


@pytest.mark.parametrize(
    "make, message", REFUSALS, ids=[m.__name__ if hasattr(m, "__name__") else "" for m, _ in REFUSALS]
)
def test_refused_with_a_message_naming_adapter_and_field(llama, tmp_path, make, message):
    _, model, adapters, _ = llama
    directory = make(adapters, tmp_path / "bad")
    with pytest.raises(AdapterLoadError, match=r"adapter 'a' refused: .*" + message):
        load(model, directory)


def test_every_config_problem_is_reported_at_once():
    raw = {
        "name": "x",
        "model_type": "llama",
        "hidden_size": 64,
        "config": {
            "mh_adapter": True,
            "output_adapter": True,
            "reduction_factor": -1,
            "non_linearity": "nope",
            "use_gating": True,
            "scaling": "cubic",
        },
    }
    with pytest.raises(AdapterLoadError) as info:
        BottleneckSpec.from_dict("x", raw)
    assert len(info.value.problems) == 4


def test_an_architecture_without_places_is_refused(llama):
    _, _, adapters, _ = llama
    with pytest.raises(AdapterLoadError, match="no bottleneck adapter places"):
        load_bottleneck_adapter("a", adapters / "pfeiffer", None)


def test_size_cap(llama):
    _, model, adapters, _ = llama
    with pytest.raises(AdapterLoadError, match="over the cap"):
        load_bottleneck_adapter("a", adapters / "pfeiffer", bottleneck_layout(model), max_bytes=10)


def test_format_detected_by_files_and_config(llama, tmp_path):
    _, _, adapters, lora = llama
    assert adapter_format("a", adapters / "pfeiffer") == BOTTLENECK
    assert adapter_format("a", lora) == LORA
    pickle_only = _pickle_only(adapters, tmp_path / "pickle")
    assert adapter_format("a", pickle_only) == BOTTLENECK
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(adapters / "pfeiffer" / "adapter_config.json", config_only)
    assert adapter_format("a", config_only) == BOTTLENECK
    mismatched = copy(lora, tmp_path / "mismatched")
    shutil.copy(adapters / "pfeiffer" / "adapter_config.json", mismatched)
    with pytest.raises(
        AdapterLoadError, match="weight files are PEFT LoRA's but adapter_config.json is AdapterHub's"
    ):
        adapter_format("a", mismatched)
    both = copy(lora, tmp_path / "both")
    shutil.copy(adapters / "pfeiffer" / WEIGHTS_FILE, both)
    with pytest.raises(AdapterLoadError, match="both PEFT and AdapterHub weight files"):
        adapter_format("a", both)


def test_converter_makes_a_pickle_adapter_loadable(llama, tmp_path, capsys):
    _, model, adapters, _ = llama
    directory = _pickle_only(adapters, tmp_path / "pickle")
    assert main([str(directory)]) == 0
    assert "wrote" in capsys.readouterr().out
    converted = load(model, directory)
    assert converted.version == load(model, adapters / "pfeiffer").version
    with pytest.raises(ConversionError, match="exists already"):
        convert_directory(directory)


def test_converter_refuses_unsafe_pickles_and_empty_directories(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConversionError, match="no pickle weights"):
        convert_directory(empty)
    assert main([str(empty)]) == 1
    unsafe = tmp_path / "unsafe"
    unsafe.mkdir()
    torch.save({"w": torch.zeros(1), "obj": ConversionError("x")}, unsafe / "pytorch_adapter.bin")
    with pytest.raises(ConversionError, match="cannot be read safely"):
        convert_directory(unsafe)
    not_tensors = tmp_path / "not_tensors"
    not_tensors.mkdir()
    torch.save({"w": 3}, not_tensors / "adapter_model.bin")
    with pytest.raises(ConversionError, match="mapping of names to tensors"):
        convert_directory(not_tensors)


def test_engine_serves_bottleneck_and_lora_side_by_side_and_records_refusals(llama, tmp_path):
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine

    base, _, adapters, lora = llama
    root = tmp_path / "served"
    copy(adapters / "houlsby", root / "houlsby")
    copy(lora, root / "lora")
    _mutate_config(use_gating=True)(adapters, root / "gated")
    engine = Engine.load(EngineConfig(base_model=base, adapter_dir=root))
    assert sorted(e.adapter_id for e in engine.bank.entries()) == ["houlsby", "lora"]
    assert "use_gating" in engine.refused["gated"]
