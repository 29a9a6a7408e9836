"""How the bottleneck places compute: each group at its own width, the residual algebra of every form,
and no hooks (so no adapter work) where a batch routes no row."""

from __future__ import annotations

import itertools

import pytest
import torch
from multiadapter.bank import BASE_SLOT
from multiadapter.base_model import bottleneck_site
from multiadapter.bottleneck import (
    FFN,
    BottleneckForm,
    BottleneckPlace,
    GatheredBottleneck,
    bottleneck_delta,
)
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine
from torch.nn import functional as F

from tests.adapterhub_factories import build_mixed_family

FLAGS = (
    "parallel",
    "original_ln_before",
    "original_ln_after",
    "residual_before_ln",
    "adapter_residual_before_ln",
    "ln_after",
)


def reference_output(form: BottleneckForm, h, r, w: GatheredBottleneck) -> torch.Tensor:
    """AdapterHub's BottleneckLayer output for one form, written out without any cancellation."""

    def adapter(z):
        return torch.relu(z @ w.down_t + w.down_b) @ w.up_t + w.up_b

    def norm(z):
        return F.layer_norm(z, z.shape[-1:], eps=1e-5) * w.ln_w + w.ln_b

    if form.parallel:
        up = adapter(r)
        out = (norm(up) if form.ln_after else up) + h
    else:
        x = h + r if form.original_ln_before else h
        residual = h if form.residual_before_ln else x
        up = adapter(x)
        if not form.ln_after:
            out = up + residual
        elif form.adapter_residual_before_ln:
            out = norm(up + residual)
        else:
            out = norm(up) + residual
    return out + r if form.original_ln_after else out


@pytest.mark.parametrize("flags", list(itertools.product([False, True], repeat=len(FLAGS))))
def test_delta_plus_residual_add_is_the_adapterhub_output_for_every_form(flags):
    form = BottleneckForm(**dict(zip(FLAGS, flags, strict=True)), activation="relu")
    g = torch.Generator().manual_seed(sum(f << i for i, f in enumerate(flags)))
    n, t, hidden, m = 3, 2, 8, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    w = GatheredBottleneck(
        rand(hidden, m), rand(m), rand(m, hidden), rand(hidden), rand(hidden), rand(hidden)
    )
    h, r = rand(n, t, hidden), rand(n, t, hidden)
    expected = reference_output(form, h, r, w)
    assert (expected - (h + r)).abs().max() > 1e-2  # the adapter really changes the output
    delta = bottleneck_delta(form, h if form.reads_output else None, r if form.reads_residual else None, w)
    torch.testing.assert_close(h + delta + r, expected, atol=1e-12, rtol=1e-12)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    family = build_mixed_family("llama", tmp_path_factory.mktemp("bn_routing"))
    return Engine.load(
        EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, queue_timeout_ms=0)
    )


def slot(engine, adapter_id: str) -> int:
    return engine.resolve(adapter_id).slot


def test_a_narrow_adapter_computes_at_its_own_width_beside_wider_ones(engine):
    site = bottleneck_site(engine.model, BottleneckPlace(0, FFN))
    form = site.form_of_slot[slot(engine, "pfeiffer")]
    # Stored at this place: pfeiffer (4) and pfeiffer_wide (16) share a form, par_bn is 32 wide.
    assert sorted(site.storage[form].width_of_slot.values()) == [4, 16]
    assert site.form_of_slot[slot(engine, "parallel")] != form

    (alone,) = site.make_route([slot(engine, "pfeiffer")])
    assert alone.weights.down_t.shape == (64, 4) and alone.weights.up_t.shape == (4, 64)

    narrow, wide = site.make_route([slot(engine, "pfeiffer"), BASE_SLOT, slot(engine, "parallel")])
    assert narrow.rows.index.tolist() == [0] and narrow.weights.down_t.shape == (64, 4)
    assert wide.rows.index.tolist() == [2] and wide.weights.down_t.shape == (64, 32)
    assert narrow.weights.ln_w is None  # no ln_after: the norm weights are not gathered either


def hooked_modules(engine) -> list[torch.nn.Module]:
    """The norms and sub-blocks of every place a resident bottleneck adapter adapts."""
    places = {p for entry in engine.bank.entries() for p in entry.places}
    assert places
    modules = []
    layers = engine.model.model.layers
    for place in places:
        norm, block = (
            ("input_layernorm", "self_attn") if place.position != FFN else ("post_attention_layernorm", "mlp")
        )
        modules += [layers[place.layer].get_submodule(norm), layers[place.layer].get_submodule(block)]
    return modules


def has_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def test_batches_without_bottleneck_rows_run_no_hooks(engine, monkeypatch):
    modules = hooked_modules(engine)
    assert not any(has_hooks(m) for m in modules)  # outside a batch

    with engine.bank.routing([slot(engine, "pfeiffer")]):
        assert any(has_hooks(m) for m in modules)  # the check below can fail
    assert not any(has_hooks(m) for m in modules)  # removed with the routing

    def no_adapter_work(*args, **kwargs):
        raise AssertionError("bottleneck math ran for a batch without bottleneck rows")

    monkeypatch.setattr("multiadapter.bottleneck.bottleneck_delta", no_adapter_work)
    base_logits, _ = engine.logits([[1, 5, 6], [1, 7]], ["", ""])
    lora_logits, _ = engine.logits([[1, 5, 6], [1, 7]], ["lora_q", ""])
    assert (base_logits[0] - lora_logits[0]).abs().max() > 1e-3
    with engine.bank.routing([BASE_SLOT, slot(engine, "lora_q")]):
        assert not any(has_hooks(m) for m in modules)
