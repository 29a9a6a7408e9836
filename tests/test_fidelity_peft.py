"""Our batched multi-adapter forward and generation against PEFT, on random Llama and GPT-2 models."""

from __future__ import annotations

import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest

from tests.peft_factories import EOS, PAD, build_family, peft_logits, peft_reference

PROMPTS = [
    [1, 5, 6, 7, 8, 9, 10, 11],
    [1, 12, 13],
    [1, 20, 21, 22, 23, 24],
    [1, 30],
    [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49],
    [1, 50, 51, 52],
    [1, 60, 61, 62, 63],
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def family(request, tmp_path_factory):
    return build_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def engine(family):
    return Engine.load(
        EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, queue_timeout_ms=0)
    )


@pytest.fixture(scope="module")
def reference(family):
    return peft_reference(family)


def mixed_ids(family) -> list[str]:
    """Every adapter and the base, twice over, interleaved, one per prompt."""
    cycle = [*family.adapter_ids, ""]
    return [cycle[i % len(cycle)] for i in range(len(PROMPTS))]


def test_every_adapter_loaded_nothing_refused(engine, family):
    assert engine.refused == {}
    assert sorted(e.adapter_id for e in engine.bank.entries()) == sorted(family.adapter_ids)
    versions = {e.version for e in engine.bank.entries()}
    assert len(versions) == len(family.adapter_ids)


def test_adapters_differ_from_each_other_and_from_base(engine, reference, family):
    # Precondition of every comparison below: a zero or identical adapter would pass vacuously.
    prompt = [PROMPTS[0]]
    outputs = {}
    for adapter_id in ["", *family.adapter_ids]:
        logits, batch = engine.logits(prompt, [adapter_id])
        outputs[adapter_id] = peft_logits(reference, batch, [adapter_id])[0, -1]
    ids = list(outputs)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-2, f"{a or 'base'} and {b or 'base'} agree"


def test_mixed_batch_logits_match_peft(engine, reference, family):
    adapter_ids = mixed_ids(family)
    ours, batch = engine.logits(PROMPTS, adapter_ids)
    theirs = peft_logits(reference, batch, adapter_ids)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def test_base_rows_equal_the_plain_model(engine, family):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(family.base_dir).eval()
    ours, batch = engine.logits(PROMPTS, [""] * len(PROMPTS))
    with torch.no_grad():
        theirs = plain(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
        ).logits
    real = batch.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)


def peft_greedy(reference, prompt, adapter_id, max_new_tokens):
    with torch.no_grad():
        out = reference.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            adapter_names=[adapter_id or "__base__"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            eos_token_id=EOS,
        )
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(EOS) + 1] if EOS in new else new


def test_mixed_batch_greedy_generation_matches_peft_token_for_token(engine, reference, family):
    adapter_ids = mixed_ids(family)
    max_tokens = 16
    results = engine.generate(
        [GenerationRequest(p, a, max_tokens=max_tokens) for p, a in zip(PROMPTS, adapter_ids, strict=True)]
    )
    for prompt, adapter_id, result in zip(PROMPTS, adapter_ids, results, strict=True):
        assert result.adapter_id == adapter_id
        expected = peft_greedy(reference, prompt, adapter_id, max_tokens)
        assert result.output_ids == expected, f"adapter {adapter_id or 'base'} prompt {prompt}"


def test_output_does_not_depend_on_batch_companions(engine, family):
    adapter_ids = mixed_ids(family)
    together = engine.generate(
        [GenerationRequest(p, a, max_tokens=12) for p, a in zip(PROMPTS, adapter_ids, strict=True)]
    )
    for prompt, adapter_id, shared in zip(PROMPTS, adapter_ids, together, strict=True):
        (alone,) = engine.generate([GenerationRequest(prompt, adapter_id, max_tokens=12)])
        assert alone.output_ids == shared.output_ids
