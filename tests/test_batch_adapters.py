"""A batch's per-row adapter weights, kept from step to step (batch_adapters.py).

The truth is each row computed alone with its adapter's own matrices (x @ A^T @ B^T added to the base layer),
written out here from the adapter's tensors, not through the bank. Random sequences of the operations the
engine loop performs (rows leave, rows join, other rows altogether, adapters added with a larger rank,
adapters removed) must keep every row's output equal to that truth.
"""

from __future__ import annotations

import random

import pytest
import torch
from multiadapter.bank import BASE_SLOT, AdapterBank
from multiadapter.batch_adapters import compact_order
from multiadapter.layers import BankedLinear
from multiadapter.lora_loading import LoraAdapter, LoraModuleWeights
from torch import nn

IN, HIDDEN, OUT = 5, 7, 3


class _Two(nn.Module):
    """Two linear layers; adapters target either or both."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.p = nn.Linear(IN, HIDDEN)
        self.q = nn.Linear(HIDDEN, OUT)
        for param in self.parameters():
            param.data = torch.randn(param.shape, generator=gen)

    def forward(self, x):
        return self.q(torch.tanh(self.p(x)))


def _adapter(adapter_id: str, rank: int, targets: tuple[str, ...], seed: int) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"p": (IN, HIDDEN), "q": (HIDDEN, OUT)}
    modules = {
        name: LoraModuleWeights(
            torch.randn(rank, shapes[name][0], generator=gen),
            torch.randn(shapes[name][1], rank, generator=gen),
            rank,
            1.0,
        )
        for name in targets
    }
    return LoraAdapter(adapter_id, f"v{seed}", modules)


def _alone(model: _Two, x: torch.Tensor, adapter: LoraAdapter | None) -> torch.Tensor:
    """One row [T, IN] through the two layers with `adapter`'s deltas written out."""
    p, q = model.p.base if isinstance(model.p, BankedLinear) else model.p, model.q
    q = q.base if isinstance(q, BankedLinear) else q
    modules = adapter.modules if adapter is not None else {}

    def delta(name, h):
        w = modules.get(name)
        return 0 if w is None else h @ w.a.T @ w.b_scaled.T

    h = torch.tanh(p(x) + delta("p", x))
    return q(h) + delta("q", h)


@pytest.mark.parametrize(
    "alive",
    [
        [True] * 4,
        [False] * 3,
        [True, False, True, True],
        [False, True, False, True, True],
        [False, False, True],
    ],
)
def test_compact_order_keeps_survivors_in_place(alive):
    order = compact_order(alive)
    assert sorted(order) == [i for i, a in enumerate(alive) if a]
    assert all(order[i] == i for i in range(len(order)) if alive[i])  # survivors never move


def test_random_operations_keep_every_row_exact():
    rng = random.Random(7)
    torch.manual_seed(7)
    model = _Two()
    bank = AdapterBank(model, capacity=12)
    pool = [
        _adapter(
            f"a{i}", rank=rng.choice([1, 2, 3]), targets=rng.choice([("p",), ("q",), ("p", "q")]), seed=i
        )
        for i in range(6)
    ]
    resident: dict[int, LoraAdapter] = {}
    for adapter in pool[:4]:
        resident[bank.add(adapter).slot] = adapter
    later = iter([_adapter("wide", 6, ("p", "q"), 100), *pool[4:]])

    def draw(n: int) -> list[int]:
        return [rng.choice([BASE_SLOT, *resident]) for _ in range(n)]

    def check(batch) -> None:
        x = torch.randn(len(batch), 2, IN)
        with torch.no_grad(), bank.routing(batch):
            out = model(x)
        with torch.no_grad():
            for i, slot in enumerate(batch.slots):
                torch.testing.assert_close(out[i], _alone(model, x[i], resident.get(slot)))

    batch = bank.batch(draw(6))
    check(batch)
    distinct_seen = 0
    for _ in range(120):
        op = rng.choice(["leave", "leave", "join", "join", "permute", "assign", "add", "remove", "same"])
        if op == "leave" and len(batch) > 1:
            order = compact_order([rng.random() < 0.7 for _ in batch.slots])
            if order:
                bank.select(batch, order)
        elif op == "join":
            other = bank.batch(draw(rng.randint(1, 4)))
            if rng.random() < 0.5:
                check(other)  # the joining rows were routed (prefilled) before they join
            bank.extend(batch, other)
        elif op == "permute" and len(batch) > 1:
            order = rng.sample(range(len(batch)), rng.randint(1, len(batch)))
            bank.select(batch, order)
        elif op == "assign":
            batch = bank.batch(draw(rng.randint(1, 8)))
        elif op == "add":
            adapter = next(later, None)
            if adapter is not None and not bank.full:
                resident[bank.add(adapter).slot] = adapter
        elif op == "remove":
            unused = [s for s in resident if s not in batch.slots and resident[s].adapter_id != "wide"]
            if unused and len(resident) > 3:
                slot = rng.choice(unused)
                bank.remove(slot)
                del resident[slot]
        distinct_seen = max(distinct_seen, len({s for s in batch.slots if s != BASE_SLOT}))
        check(batch)
    assert distinct_seen >= 3  # the kept per-row weights were really used (several adapters in one batch)
    assert "wide" in {a.adapter_id for a in resident.values()}
    assert model.p.layout > 0 and model.q.layout > 0  # the rank grew under a kept batch


def test_rows_keep_their_weights_across_steps_and_departures():
    model = _Two()
    bank = AdapterBank(model, capacity=4)
    slots = [bank.add(_adapter(f"a{i}", 2, ("p", "q"), seed=i)).slot for i in range(4)]
    batch = bank.batch([slots[0], slots[1], slots[2], slots[3], slots[0]])
    x = torch.randn(5, 1, IN)
    with torch.no_grad(), bank.routing(batch):
        model(x)
    kept = batch._weights[model.p]
    buffer = kept.a
    with torch.no_grad(), bank.routing(batch):
        assert model.p.route.a_t.data_ptr() == buffer.data_ptr()  # a step without changes: the same views
    bank.select(batch, compact_order([True, False, True, True, True]))  # row 1 leaves, row 4 fills its hole
    with torch.no_grad(), bank.routing(batch):
        out = model(x[[0, 4, 2, 3]])
    assert batch._weights[model.p].a is buffer  # moved in place, not gathered again
    assert batch.slots == [slots[0], slots[0], slots[2], slots[3]]
    for i, slot in enumerate(batch.slots):
        adapter = _adapter(f"a{slots.index(slot)}", 2, ("p", "q"), seed=slots.index(slot))
        torch.testing.assert_close(out[i], _alone(model, x[[0, 4, 2, 3]][i], adapter))
