"""Merged-weight variants offline: the merge tool's output, the engine serving it, its configuration."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest
from multiadapter.errors import ConfigError, InvalidRequest
from multiadapter.merged_variant import MERGED_INFO_FILE, MergedInfo

from tools.merge import STAMP_FILE, MergeError, build_variants, parse_ids

PROMPTS = [[1, 104, 105, 3], [1, 120, 121, 122, 123, 3], [1, 98, 3]]


@pytest.fixture(scope="module")
def variant(tiny_model, tmp_path_factory):
    """The merged variant of the tiny model's first LoRA adapter."""
    adapter_id = tiny_model.adapter_ids[0]
    out = tmp_path_factory.mktemp("merged")
    (built,) = build_variants(
        [adapter_id],
        base_model=tiny_model.base_model,
        adapter_dir=tiny_model.adapter_dir,
        out=out,
        progress=False,
    )
    return built


@pytest.fixture(scope="module")
def merged_engine(variant):
    return Engine.load(EngineConfig.from_parameters({"merged_model": str(variant.weights)}, env={}))


def test_the_merged_engine_answers_as_the_bank_with_the_adapters_identity(
    merged_engine, offline_engine, variant
):
    offline_engine, _ = offline_engine
    adapter_id = variant.adapter_id
    bank = offline_engine.generate([GenerationRequest(p, adapter_id, max_tokens=8) for p in PROMPTS])
    base = offline_engine.generate([GenerationRequest(p, "", max_tokens=8) for p in PROMPTS])
    assert [b.output_ids for b in bank] != [b.output_ids for b in base]  # the adapter changes the answers
    for requested in (adapter_id, ""):
        merged = merged_engine.generate([GenerationRequest(p, requested, max_tokens=8) for p in PROMPTS])
        assert [m.output_ids for m in merged] == [b.output_ids for b in bank]
        assert {(m.adapter_id, m.adapter_version) for m in merged} == {(adapter_id, bank[0].adapter_version)}

    ours, batch = offline_engine.logits(PROMPTS, [adapter_id] * len(PROMPTS))
    theirs, _ = merged_engine.logits(PROMPTS, [adapter_id] * len(PROMPTS))
    real = batch.attention_mask.bool()
    torch.testing.assert_close(theirs[real], ours[real], atol=1e-4, rtol=0)


def test_the_merged_engine_refuses_other_adapter_ids_per_request(merged_engine, tiny_model, variant):
    other = next(a for a in tiny_model.adapter_ids if a != variant.adapter_id)
    outcomes = merged_engine.generate(
        [GenerationRequest(PROMPTS[0], other), GenerationRequest(PROMPTS[0], variant.adapter_id)]
    )
    assert isinstance(outcomes[0], InvalidRequest)
    assert f"must be empty or {variant.adapter_id!r}, got {other!r}" in str(outcomes[0])
    assert outcomes[1].adapter_id == variant.adapter_id
    assert len(merged_engine.bank) == 0  # no bank beside the merged weights


def test_merged_model_parameter_is_not_overridden_by_the_server_paths(variant, tiny_model):
    env = {"MULTIADAPTER_BASE_MODEL": str(tiny_model.base_model), "MULTIADAPTER_ADAPTER_DIR": "/nowhere"}
    config = EngineConfig.from_parameters({"merged_model": str(variant.weights)}, env=env)
    assert config.base_model == variant.weights and config.adapter_dir is None and config.merged


def test_merged_model_configuration_errors_are_named(variant, tiny_model):
    with pytest.raises(ConfigError, match="merged_model excludes base_model and adapter_dir"):
        EngineConfig.from_parameters(
            {"merged_model": str(variant.weights), "adapter_dir": str(tiny_model.adapter_dir)}, env={}
        )
    with pytest.raises(ConfigError, match=f"has no {MERGED_INFO_FILE}: build it with tools.merge"):
        EngineConfig.from_parameters({"merged_model": str(tiny_model.base_model)}, env={})


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ("not json", "not readable JSON"),
        ({"format": 2}, "is not format 1"),
        (
            {"format": 1, "adapter_id": "../x", "adapter_version": "v", "base_model": "b", "dtype": "f"},
            "invalid",
        ),
        ({"format": 1, "adapter_id": "", "adapter_version": "v", "base_model": "b", "dtype": "f"}, "empty"),
        ({"format": 1, "adapter_id": "a", "adapter_version": 3, "base_model": "b", "dtype": "f"}, "string"),
    ],
)
def test_a_bad_merged_info_file_is_refused(tmp_path, payload, problem):
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (tmp_path / MERGED_INFO_FILE).write_text(text)
    with pytest.raises(ConfigError, match=problem):
        MergedInfo.load(tmp_path)


def test_variants_are_rebuilt_only_when_missing_or_out_of_date(tiny_model, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model.base_model, base)
    adapter_id = tiny_model.adapter_ids[0]
    kwargs = dict(
        base_model=base, adapter_dir=tiny_model.adapter_dir, out=tmp_path / "merged", progress=False
    )
    (variant,) = build_variants([adapter_id], **kwargs)
    weights = variant.weights / "model.safetensors"

    def rebuilt(**extra) -> bool:
        before = weights.stat().st_mtime_ns
        build_variants([adapter_id], **kwargs, **extra)
        return weights.stat().st_mtime_ns != before

    assert not rebuilt()  # up to date: reused
    assert rebuilt(force=True)
    assert rebuilt(dtype="bfloat16") and MergedInfo.load(variant.weights).dtype == "bfloat16"
    assert not rebuilt(dtype="bfloat16")
    stamp = json.loads((variant.weights / STAMP_FILE).read_text())
    (variant.weights / STAMP_FILE).write_text(json.dumps({**stamp, "adapter_version": "sha256:old"}))
    assert rebuilt(dtype="bfloat16")  # made from another adapter version
    os.utime(base / "model.safetensors", ns=(1, 1))
    assert rebuilt(dtype="bfloat16")  # the base's weights were replaced in place
    (variant.weights / STAMP_FILE).unlink()
    assert rebuilt(dtype="bfloat16")  # an interrupted build (no stamp) is never taken for a finished one
    assert not list(variant.root.glob(".*.writing")) and not list(variant.repository.glob(".*"))


def test_merge_tool_checks_ids_before_building(tiny_model, tmp_path):
    assert parse_ids(" a, b ,a") == ["a", "b"]
    with pytest.raises(MergeError, match="no adapter ids"):
        parse_ids(" , ")
    with pytest.raises(MergeError, match="bottleneck adapter and cannot be merged"):
        build_variants(
            [tiny_model.adapter_ids[0], "pfeiffer"],
            base_model=tiny_model.base_model,
            adapter_dir=tiny_model.adapter_dir,
            out=tmp_path,
            progress=False,
        )
    with pytest.raises(MergeError, match="refused"):
        build_variants(
            ["broken"],
            base_model=tiny_model.base_model,
            adapter_dir=tiny_model.adapter_dir,
            out=tmp_path,
            progress=False,
        )
    assert not any(tmp_path.iterdir())


def test_a_merged_variant_serves_only_tenants_allowed_its_adapter(variant, tmp_path):
    """Under a tenant policy (here from $MULTIADAPTER_TENANT_POLICY, as the launcher sets it) a merged variant
    serves its adapter to tenants that may use it, for their empty adapter_id too; to others it fails as an
    adapter that does not exist."""
    from multiadapter.errors import AdapterNotFound
    from multiadapter.tenants import TenantRefused

    policy = tmp_path / "tenants.json"
    policy.write_text(
        json.dumps(
            {
                "tenants": {
                    "acme": {"default": "", "allow": [variant.adapter_id]},
                    "globex": {"default": "", "allow": []},
                }
            }
        )
    )
    env = {"MULTIADAPTER_TENANT_POLICY": str(policy)}
    engine = Engine.load(EngineConfig.from_parameters({"merged_model": str(variant.weights)}, env=env))
    asked = [
        GenerationRequest(PROMPTS[0], adapter, max_tokens=4, tenant_id=tenant)
        for adapter, tenant in [("", "acme"), (variant.adapter_id, "acme"), ("", "globex"), ("", None)]
    ]
    acme_empty, acme_named, globex, nobody = engine.generate(asked)
    assert acme_empty.adapter_id == acme_named.adapter_id == variant.adapter_id
    assert acme_empty.output_ids == acme_named.output_ids
    assert isinstance(globex, AdapterNotFound) and str(globex) == str(AdapterNotFound(variant.adapter_id))
    assert isinstance(nobody, TenantRefused)
