"""bf16, the GPU default, against PEFT and against the float32 truth, on the CPU here and on CUDA with a GPU.

Every test runs once per device: "cpu" always, "cuda" only where a GPU is present (marked `gpu`, skipped with
the reason otherwise; `make gpu-check` runs them there). The truth is the float32 model's uncached forward;
bf16 rounds every activation to 8 bits of mantissa, so the tolerances are stated relative to what PEFT's own
bf16 forward loses against that truth, over many prompts:

- LOGIT_SLACK: our bf16 logits may be at most this many times further from the float32 truth than PEFT's
  bf16 logits are (largest absolute error over every real position of a mixed batch), plus LOGIT_FLOOR.
- GREEDY_AGREEMENT: the share of greedy answers (mixed batches through the engine) equal to the float32
  engine's answers must be at least this (PEFT's bf16 greedy is measured beside it, for the record).
- A row's logits in a mixed batch and alone differ by at most COMPANION_TOL (bf16 matmuls may block
  differently for another batch size).
"""

from __future__ import annotations

import random

import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest

from tests.peft_factories import build_family, peft_logits, peft_reference

LOGIT_SLACK = 1.5
LOGIT_FLOOR = 0.01
GREEDY_AGREEMENT = 0.8
COMPANION_TOL = 0.1
PROMPT_COUNT = 48

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)"),
        ],
    ),
]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_family("llama", tmp_path_factory.mktemp("bf16"))


@pytest.fixture(scope="module", params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture(scope="module")
def engines(family, device):
    """(bf16 engine, float32 engine) on `device`."""
    load = lambda dtype: Engine.load(  # noqa: E731
        EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, dtype=dtype), device
    )
    return load("bfloat16"), load("float32")


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(3)
    return [[1, *(rng.randrange(3, 90) for _ in range(rng.randint(2, 14)))] for _ in range(PROMPT_COUNT)]


def adapter_cycle(family, n: int) -> list[str]:
    cycle = [*family.adapter_ids, ""]
    return [cycle[i % len(cycle)] for i in range(n)]


def test_bf16_engine_really_computes_in_bf16(engines, device):
    bf16, fp32 = engines
    assert bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert {p.device.type for p in bf16.model.parameters()} == {device.type}
    banked = [m for m in bf16.model.modules() if hasattr(m, "a_t") and m.a_t.numel()]
    assert banked and all(m.a_t.dtype == torch.bfloat16 for m in banked)


def test_bf16_logits_are_as_close_to_the_float32_truth_as_pefts(engines, family, prompts, device):
    bf16, fp32 = engines
    ids = adapter_cycle(family, len(prompts))
    truth, batch = fp32.logits(prompts, ids)
    ours, _ = bf16.logits(prompts, ids)
    reference = peft_reference(family).to(device=device, dtype=torch.bfloat16)
    theirs = peft_logits(reference, batch, ids, device)
    real = batch.attention_mask.bool().to(device)
    truth = truth.to(torch.float32)[real]
    our_error = (ours.to(torch.float32)[real] - truth).abs().max().item()
    peft_error = (theirs[real] - truth).abs().max().item()
    spread = truth.abs().max().item()
    assert peft_error > 0  # bf16 really rounds (else the comparison says nothing)
    assert our_error <= LOGIT_SLACK * peft_error + LOGIT_FLOOR, (our_error, peft_error, spread)


def test_bf16_greedy_answers_agree_with_float32_over_many_prompts(engines, family, prompts):
    bf16, fp32 = engines
    ids = adapter_cycle(family, len(prompts))
    requests = [GenerationRequest(p, a, max_tokens=8) for p, a in zip(prompts, ids, strict=True)]
    ours, truth = bf16.generate(requests), fp32.generate(requests)
    assert len({tuple(t.output_ids) for t in truth}) > len(family.adapter_ids)  # answers really differ
    agreed = sum(o.output_ids == t.output_ids for o, t in zip(ours, truth, strict=True))
    assert agreed / len(prompts) >= GREEDY_AGREEMENT, f"{agreed} of {len(prompts)}"


def test_bf16_row_does_not_depend_on_its_companions(engines, family, prompts):
    bf16, _ = engines
    ids = adapter_cycle(family, 8)
    together, batch = bf16.logits(prompts[:8], ids)
    for i in (0, 3, 7):
        alone, single = bf16.logits([prompts[i]], [ids[i]])
        width = int(single.attention_mask.sum())
        ours = together[i][batch.attention_mask[i].bool()][-width:].to(torch.float32)
        assert (
            ours - alone[0][single.attention_mask[0].bool()].to(torch.float32)
        ).abs().max() <= COMPANION_TOL


def test_a_sampled_request_depends_only_on_its_seed(engines, family, prompts):
    bf16, _ = engines
    sampled = GenerationRequest(prompts[0], family.adapter_ids[0], max_tokens=10, temperature=1.0, seed=1234)
    companions = [
        GenerationRequest(p, a, max_tokens=6)
        for p, a in zip(prompts[1:6], adapter_cycle(family, 5), strict=True)
    ]
    alone = bf16.generate([sampled])[0].output_ids
    mixed = bf16.generate([*companions[:2], sampled, *companions[2:]])[2].output_ids
    other_seed = bf16.generate([GenerationRequest(**{**sampled.__dict__, "seed": 99})])[0].output_ids
    assert alone == mixed
    assert other_seed != alone  # the seed matters (else the check above says nothing)


def test_bf16_merged_variant_answers_like_the_bank(engines, family, prompts, device, tmp_path_factory):
    """W' = W + s·B·A folded in bf16 against the bank's unmerged bf16 rows: the same greedy answers for
    most prompts (bf16 rounds W' once, the bank rounds W and the delta separately)."""
    from tools.merge import build_variants

    bf16, _ = engines
    adapter_id = family.adapter_ids[0]
    (variant,) = build_variants(
        [adapter_id],
        base_model=family.base_dir,
        adapter_dir=family.adapter_dir,
        out=tmp_path_factory.mktemp("merged-bf16"),
        dtype="bfloat16",
        progress=False,
    )
    params = {"merged_model": str(variant.weights), "dtype": "bfloat16"}
    merged = Engine.load(EngineConfig.from_parameters(params, env={}), device)
    assert merged.dtype == torch.bfloat16
    requests = [GenerationRequest(p, adapter_id, max_tokens=8) for p in prompts]
    bank = bf16.generate(requests)
    folded = merged.generate([GenerationRequest(p, "", max_tokens=8) for p in prompts])
    base = bf16.generate([GenerationRequest(p, "", max_tokens=8) for p in prompts])
    agreed = sum(b.output_ids == m.output_ids for b, m in zip(bank, folded, strict=True))
    assert (
        sum(b.output_ids == m.output_ids for b, m in zip(base, folded, strict=True)) < agreed
    )  # not the base
    assert agreed / len(prompts) >= GREEDY_AGREEMENT, f"{agreed} of {len(prompts)}"
