"""Bottleneck adapters beside LoRA and the base in one batch, against AdapterHub's and PEFT's own forwards."""

from __future__ import annotations

import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest

from tests.adapterhub_factories import build_mixed_family, lora_reference_model
from tests.peft_factories import EOS

PROMPTS = [
    [1, 5, 6, 7, 8, 9, 10, 11],
    [1, 12, 13],
    [1, 20, 21, 22, 23, 24],
    [1, 30],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
    [1, 50, 51, 52],
    [1, 60, 61, 62, 63],
    [1, 70, 71, 72, 73, 74, 75],
    [1, 80, 81],
    [1, 33, 34, 35, 36],
    [1, 90, 91, 92, 93, 94],
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
    return build_mixed_family(request.param, tmp_path_factory.mktemp(f"ah_{request.param}"))


@pytest.fixture(scope="module")
def engine(family):
    return Engine.load(
        EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, queue_timeout_ms=0)
    )


@pytest.fixture(scope="module")
def lora_reference(family):
    return lora_reference_model(family)


def mixed_ids(family) -> list[str]:
    """Every bottleneck adapter, every LoRA adapter and the base, interleaved, one per prompt."""
    cycle = [*family.bottleneck_ids, *family.lora_ids, ""]
    return [cycle[(3 * i) % len(cycle)] for i in range(len(PROMPTS))]


def reference_logits(family, lora_reference, input_ids, attention_mask, position_ids, adapter_id):
    """The owning library's forward for rows that all use `adapter_id`: AdapterHub with only that
    adapter active, PEFT for LoRA, AdapterHub with nothing active for the base."""
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    with torch.no_grad():
        if adapter_id in family.lora_ids:
            return lora_reference(**inputs, adapter_names=[adapter_id] * len(input_ids)).logits
        family.oracle.set_active_adapters(adapter_id or None)
        try:
            return family.oracle(**inputs).logits
        finally:
            family.oracle.set_active_adapters(None)


def test_every_adapter_loaded_nothing_refused(engine, family):
    assert engine.refused == {}
    entries = {e.adapter_id: e for e in engine.bank.entries()}
    assert sorted(entries) == sorted([*family.bottleneck_ids, *family.lora_ids])
    assert all(entries[a].places and not entries[a].modules for a in family.bottleneck_ids)
    assert len({e.version for e in entries.values()}) == len(entries)


def test_adapters_change_the_output_and_differ(family, lora_reference):
    # Precondition of every comparison below: an identity (zero-initialised) adapter would pass vacuously.
    prompt = torch.tensor([PROMPTS[0]])
    ones = torch.ones_like(prompt)
    positions = torch.arange(prompt.shape[1])[None]
    ids = ["", *family.bottleneck_ids, *family.lora_ids]
    outputs = {a: reference_logits(family, lora_reference, prompt, ones, positions, a)[0] for a in ids}
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-2, f"{a or 'base'} and {b or 'base'} agree"


def test_mixed_batch_logits_match_the_libraries(engine, family, lora_reference):
    adapter_ids = mixed_ids(family)
    assert set(adapter_ids) == {*family.bottleneck_ids, *family.lora_ids, ""}
    ours, batch = engine.logits(PROMPTS, adapter_ids)
    for adapter_id in set(adapter_ids):
        rows = torch.tensor([i for i, a in enumerate(adapter_ids) if a == adapter_id])
        theirs = reference_logits(
            family,
            lora_reference,
            batch.input_ids[rows],
            batch.attention_mask[rows],
            batch.position_ids[rows],
            adapter_id,
        )
        real = batch.attention_mask[rows].bool()
        torch.testing.assert_close(
            ours[rows][real], theirs[real], atol=1e-5, rtol=0, msg=adapter_id or "base"
        )


def reference_greedy(family, lora_reference, prompt, adapter_id, max_new_tokens):
    """Greedy decoding by full forwards of the owning library (no KV cache), stopping at EOS."""
    ids = list(prompt)
    new: list[int] = []
    while len(new) < max_new_tokens:
        tensor = torch.tensor([ids])
        logits = reference_logits(
            family, lora_reference, tensor, torch.ones_like(tensor), torch.arange(len(ids))[None], adapter_id
        )
        token = int(logits[0, -1].argmax())
        new.append(token)
        ids.append(token)
        if token == EOS:
            break
    return new


def test_mixed_batch_greedy_generation_matches_token_for_token(engine, family, lora_reference):
    adapter_ids = mixed_ids(family)
    max_tokens = 12
    results = engine.generate(
        [GenerationRequest(p, a, max_tokens=max_tokens) for p, a in zip(PROMPTS, adapter_ids, strict=True)]
    )
    for prompt, adapter_id, result in zip(PROMPTS, adapter_ids, results, strict=True):
        assert result.adapter_id == adapter_id
        expected = reference_greedy(family, lora_reference, prompt, adapter_id, max_tokens)
        assert result.output_ids == expected, f"adapter {adapter_id or 'base'} prompt {prompt}"


def test_output_does_not_depend_on_batch_companions(engine, family):
    adapter_ids = mixed_ids(family)
    together = engine.generate(
        [GenerationRequest(p, a, max_tokens=10) for p, a in zip(PROMPTS, adapter_ids, strict=True)]
    )
    for prompt, adapter_id, shared in zip(PROMPTS, adapter_ids, together, strict=True):
        (alone,) = engine.generate([GenerationRequest(prompt, adapter_id, max_tokens=10)])
        assert alone.output_ids == shared.output_ids, adapter_id or "base"


def test_same_adapter_on_every_row_matches_the_library(engine, family, lora_reference):
    # Every row of one bottleneck adapter takes the shared-weights path, not the per-row gather.
    adapter_id = family.bottleneck_ids[1]
    ours, batch = engine.logits(PROMPTS[:3], [adapter_id] * 3)
    theirs = reference_logits(
        family, lora_reference, batch.input_ids, batch.attention_mask, batch.position_ids, adapter_id
    )
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_removed_bottleneck_frees_its_slot_and_stops_routing(engine, family):
    adapter_id = family.bottleneck_ids[0]
    before, _ = engine.logits([PROMPTS[0]], [adapter_id])
    base, _ = engine.logits([PROMPTS[0]], [""])
    slot = engine.resolve(adapter_id).slot
    assert engine.adapters.evict(adapter_id)
    assert slot not in [e.slot for e in engine.bank.entries()]
    other = family.bottleneck_ids[2]
    with_other, _ = engine.logits([PROMPTS[0], PROMPTS[0]], ["", other])
    torch.testing.assert_close(with_other[0], base[0], atol=1e-6, rtol=0)
    after, _ = engine.logits([PROMPTS[0]], [adapter_id])  # loaded again, from its host copy
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_adapters_of_one_form_share_a_group_gathered_per_row(engine, family):
    # Guards the per-row gather path that the mixed-batch comparison above relies on.
    from multiadapter.base_model import bottleneck_site
    from multiadapter.bottleneck import FFN, BottleneckPlace

    slots = [engine.resolve(a).slot for a in ("pfeiffer", "", "pfeiffer_wide", "houlsby")]
    site = bottleneck_site(engine.model, BottleneckPlace(0, FFN))
    by_rows = {tuple(g.rows.index.tolist()): g for g in site.make_route(slots)}
    assert set(by_rows) == {(0, 2), (3,)}
    # The group computes at its widest routed adapter (pfeiffer_wide, 16), not par_bn's 32 stored beside it.
    assert by_rows[(0, 2)].weights.down_t.shape == (2, 64, 16)
    assert by_rows[(3,)].weights.down_t.shape == (64, 4)
