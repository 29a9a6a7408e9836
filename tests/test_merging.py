"""Merging LoRA adapters into the base weights: equal to PEFT's merge_and_unload, and what is refused."""

from __future__ import annotations

import dataclasses

import adapters
import pytest
import torch
from multiadapter.base_model import banked_layer, bottleneck_layout, describe_modules
from multiadapter.bottleneck_loading import load_bottleneck_adapter
from multiadapter.errors import AdapterLoadError
from multiadapter.lora_loading import LoraAdapter, LoraModuleWeights, load_lora_adapter
from multiadapter.merging import merge_into, merged_weights, require_mergeable
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.adapterhub_factories import randomize_bottleneck
from tests.peft_factories import GPT2_ADAPTERS, LLAMA_ADAPTERS, VOCAB, build_adapter, build_base

ALL_LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = [
    *(("llama", name, spec) for name, spec in LLAMA_ADAPTERS.items()),
    *(("gpt2", name, spec) for name, spec in GPT2_ADAPTERS.items()),
    # rank 16 with rsLoRA and per-module ranks / alphas on a subset of layers
    (
        "llama",
        "r16_rs_pat_l0",
        dict(
            r=16,
            lora_alpha=32,
            use_rslora=True,
            target_modules=ALL_LLAMA,
            rank_pattern={"o_proj": 1, "gate_proj": 4},
            alpha_pattern={"q_proj": 5.0},
            layers_to_transform=[0],
        ),
    ),
    # Conv1D with rank / alpha patterns and rsLoRA
    (
        "gpt2",
        "conv_pat_rs",
        dict(
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["c_attn", "c_fc", "c_proj"],
            fan_in_fan_out=True,
            rank_pattern={"c_fc": 16, "attn.c_proj": 1},
            alpha_pattern={"c_attn": 2.0},
        ),
    ),
]
TOKENS = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_bases")
    return {kind: build_base(kind, root / kind) for kind in ("llama", "gpt2")}


def load_model(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def load_ours(model, directory) -> LoraAdapter:
    return load_lora_adapter("a", directory, describe_modules(model))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("kind", "name", "spec"), CASES, ids=[f"{k}-{n}" for k, n, _ in CASES])
def test_merge_equals_peft_merge_and_unload(bases, tmp_path, kind, name, spec):
    directory = build_adapter(bases[kind], tmp_path / name, seed=11, **spec)
    model = load_model(bases[kind])
    before = snapshot(model)
    adapter = load_ours(model, directory)

    peft_model = PeftModel.from_pretrained(load_model(bases[kind]), directory).eval()
    peft_logits = logits(peft_model)
    reference = peft_model.merge_and_unload().state_dict()

    ours = merged_weights(model, adapter, torch.float32)
    # the adapter really changes exactly the weights we merged (so this test can fail)
    changed = {k for k, v in reference.items() if (v - before[k]).abs().max() > 1e-3}
    assert changed and set(ours) == changed == {f"{m}.weight" for m in adapter.modules}
    for key, value in ours.items():
        assert value.dtype == torch.float32 and value.shape == before[key].shape
        torch.testing.assert_close(value, reference[key], atol=1e-5, rtol=0)
    # merged_weights leaves the model alone
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key

    merge_into(model, adapter, torch.float32)
    merged_state = model.state_dict()
    assert set(merged_state) == set(reference)
    for key, value in merged_state.items():
        torch.testing.assert_close(value, reference[key], atol=1e-5, rtol=0, msg=key)
    # the merged model computes what PEFT's unmerged adapter computes
    ours_logits = logits(model)
    torch.testing.assert_close(ours_logits, peft_logits, atol=1e-4, rtol=0)
    assert (ours_logits - logits(load_model(bases[kind]))).abs().max() > 1e-3
    assert torch.equal(ours_logits.argmax(-1), peft_logits.argmax(-1))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_merge(bases, tmp_path, kind):
    spec = LLAMA_ADAPTERS["mlp_pat"] if kind == "llama" else GPT2_ADAPTERS["all16rs"]
    directory = build_adapter(bases[kind], tmp_path / "a", seed=3, **spec)
    model = load_model(bases[kind])
    adapter = load_ours(model, directory)
    fp32 = merged_weights(model, adapter, torch.float32)
    bf16 = merged_weights(model, adapter, torch.bfloat16)
    assert set(bf16) == set(fp32)
    for key, value in bf16.items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, fp32[key].to(torch.bfloat16))  # merged in fp32, cast once

    reference = load_model(bases[kind])
    merge_into(reference, adapter, torch.float32)
    merge_into(model, adapter, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for key, value in bf16.items():
        assert torch.equal(model.state_dict()[key], value)
    out = logits(model)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), logits(reference), atol=0.15, rtol=0.05)


def test_merge_from_bf16_base_computes_in_fp32(bases, tmp_path):
    directory = build_adapter(bases["llama"], tmp_path / "a", seed=4, **LLAMA_ADAPTERS["q1"])
    model = load_model(bases["llama"]).to(torch.bfloat16)
    adapter = load_ours(model, directory)
    (key, value), *_ = merged_weights(model, adapter, torch.float32).items()
    name = key.removesuffix(".weight")
    module = adapter.modules[name]
    expected = model.get_submodule(name).weight.float() + module.b_scaled @ module.a
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


def test_wrapped_layer_merges_under_its_state_dict_key(bases, tmp_path):
    directory = build_adapter(bases["gpt2"], tmp_path / "a", seed=5, **GPT2_ADAPTERS["attn2"])
    model = load_model(bases["gpt2"])
    adapter = load_ours(model, directory)
    plain = merged_weights(model, adapter, torch.float32)
    name = next(iter(adapter.modules))
    banked_layer(model, name)
    wrapped = merged_weights(model, adapter, torch.float32)
    assert f"{name}.base.weight" in model.state_dict()
    assert set(wrapped) == set(plain) - {f"{name}.weight"} | {f"{name}.base.weight"}
    assert torch.equal(wrapped[f"{name}.base.weight"], plain[f"{name}.weight"])


def test_bottleneck_adapter_is_refused(bases, tmp_path):
    hub_model = load_model(bases["llama"])
    adapters.init(hub_model)
    hub_model.add_adapter("bn", config="seq_bn")
    randomize_bottleneck(hub_model, "bn", seed=9)
    hub_model.save_adapter(str(tmp_path / "bn"), "bn", use_safetensors=True)

    model = load_model(bases["llama"])
    before = snapshot(model)
    bottleneck = load_bottleneck_adapter(
        "bn", tmp_path / "bn", bottleneck_layout(model), output_weight=model.get_output_embeddings().weight
    )
    for call in (
        lambda: require_mergeable(bottleneck),
        lambda: merged_weights(model, bottleneck, torch.float32),
        lambda: merge_into(model, bottleneck, torch.bfloat16),
    ):
        with pytest.raises(AdapterLoadError, match="non-linear") as info:
            call()
        assert info.value.adapter_id == "bn"
        assert "activation" in str(info.value) and "residual stream" in str(info.value)
    with pytest.raises(TypeError, match="only a LoraAdapter"):
        require_mergeable({"q_proj": None})
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key])


def fake_module(rank: int, n_in: int, n_out: int) -> LoraModuleWeights:
    return LoraModuleWeights(
        a=torch.randn(rank, n_in), b_scaled=torch.randn(n_out, rank), rank=rank, scale=1.0
    )


def test_absent_module_mismatched_shape_and_tied_weight_are_refused(bases, tmp_path):
    directory = build_adapter(bases["llama"], tmp_path / "a", seed=6, **LLAMA_ADAPTERS["kv_l1"])
    llama = load_model(bases["llama"])
    adapter = load_ours(llama, directory)
    gpt2 = load_model(bases["gpt2"])
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.1\.self_attn\.k_proj: no such module"):
        merged_weights(gpt2, adapter, torch.float32)

    good = next(iter(adapter.modules))
    bad = dataclasses.replace(
        adapter,
        modules={
            good: adapter.modules[good],  # valid, yet nothing may change when another module is refused
            "model.layers.0.mlp.down_proj": fake_module(2, 64, 128),  # down_proj is [64, 128]: in/out swapped
            "model.layers.0.input_layernorm": fake_module(2, 64, 64),
        },
    )
    before = snapshot(llama)
    with pytest.raises(AdapterLoadError) as info:
        merge_into(llama, bad, torch.bfloat16)
    message = str(info.value)
    assert "model.layers.0.mlp.down_proj: A (2, 64) / B (128, 2) do not fit the Linear" in message
    assert "model.layers.0.input_layernorm: is a LlamaRMSNorm, not a Linear / Conv1D layer" in message
    assert good not in message
    for key, value in llama.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, before[key])

    # GPT-2's output layer shares its weight with the token embedding
    tied = LoraAdapter("t", "v", {"lm_head": fake_module(2, 64, VOCAB)})
    with pytest.raises(AdapterLoadError, match="lm_head: its weight is tied to transformer.wte.weight"):
        merged_weights(gpt2, tied, torch.float32)
