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
from multiadapter import batch_adapters
from multiadapter.bank import BASE_SLOT, AdapterBank
from multiadapter.batch_adapters import compact_order
from multiadapter.layers import BankedLinear, GroupedRoute, Route
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


@pytest.fixture
def group_readily(monkeypatch):
    """Group rows by adapter from two rows per adapter on (the default threshold suits a CPU's costs, and
    small batches would rarely reach it)."""
    monkeypatch.setattr(batch_adapters, "GROUP_MIN_ROWS_PER_ADAPTER", 2)


@pytest.mark.parametrize("grouping", ["default", "readily"])
def test_random_operations_keep_every_row_exact(grouping, request):
    if grouping == "readily":
        request.getfixturevalue("group_readily")
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

    kinds_seen: set[str] = set()

    def check(batch) -> None:
        x = torch.randn(len(batch), 2, IN)
        with torch.no_grad(), bank.routing(batch):
            out = model(x)
            kinds_seen.update(_kind(layer.route) for layer in (model.p, model.q))
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
    assert distinct_seen >= 3  # several adapters in one batch
    grouped = {"grouped", "grouped, padded"} if grouping == "readily" else set()
    assert kinds_seen >= {"shared", "per-row", *grouped}  # every route kind was checked
    assert "wide" in {a.adapter_id for a in resident.values()}
    assert model.p.layout > 0 and model.q.layout > 0  # the rank grew under a kept batch


def _kind(route) -> str:
    if isinstance(route, GroupedRoute):
        return "grouped" if route.take is None else "grouped, padded"
    if isinstance(route, Route):
        return "shared" if route.a_t.dim() == 2 else "per-row"
    return "none"


def test_rows_grouped_by_adapter_read_each_adapter_once(group_readily):
    """Adapters with several rows each are computed per adapter: the route holds each adapter's weights once,
    at the largest rank present (not the bank's), and every row still gets exactly its own adapter."""
    model = _Two()
    bank = AdapterBank(model, capacity=4)
    narrow = [_adapter("r1", 1, ("p", "q"), seed=1), _adapter("r2", 2, ("p",), seed=2)]
    wide = _adapter("r6", 6, ("p", "q"), seed=3)  # makes the bank's storage rank 6
    slots = [bank.add(a).slot for a in [*narrow, wide]]
    by_slot = dict(zip(slots, [*narrow, wide], strict=True))
    s1, s2, _ = slots
    rows = [s2, s1, BASE_SLOT, s1, s2, s1, s2, s1]  # 4 + 3 rows over two adapters, one base row
    batch = bank.batch(rows)
    x = torch.randn(len(rows), 3, IN)
    with torch.no_grad(), bank.routing(batch):
        out = model(x)
        route_p, route_q = model.p.route, model.q.route
    assert isinstance(route_p, GroupedRoute) and route_p.a_t.shape[0] == 2  # two adapters, read once each
    assert route_p.a_t.shape[2] == 2 < model.p.max_rank == 6  # the largest rank present, not the bank's
    assert route_p.take is not None  # 4 and 3 rows: the smaller group is padded
    assert isinstance(route_q, Route) and route_q.a_t.shape == (HIDDEN, 1)  # q: only r1 adapts it
    with torch.no_grad():
        for i, slot in enumerate(rows):
            torch.testing.assert_close(out[i], _alone(model, x[i], by_slot.get(slot)))
    kept = batch._groups[model.p].a
    bank.select(batch, compact_order([True, True, True, False, True, True, True, True]))  # an s1 row leaves
    with torch.no_grad(), bank.routing(batch):
        model(x[:7])
        assert model.p.route.a_t.data_ptr() == kept.data_ptr()  # the same adapters: not read again


def test_grouped_weights_follow_adapters_that_leave_arrive_and_reuse_a_slot(group_readily):
    """Kept group weights are updated in place as adapters leave and arrive, and an adapter stored in a slot
    that another adapter held before (freed while no row used it) is copied afresh, not served stale."""
    model = _Two()
    bank = AdapterBank(model, capacity=4)
    first = [_adapter(f"g{i}", 2, ("p", "q"), seed=10 + i) for i in range(3)]
    by_slot = {bank.add(a).slot: a for a in first}
    s0, s1, s2 = by_slot

    def check(batch) -> None:
        x = torch.randn(len(batch), 2, IN)
        with torch.no_grad(), bank.routing(batch):
            out = model(x)
            assert isinstance(model.p.route, GroupedRoute)
        with torch.no_grad():
            for i, slot in enumerate(batch.slots):
                torch.testing.assert_close(out[i], _alone(model, x[i], by_slot.get(slot)))

    batch = bank.batch([s0, s1, s2, s0, s1, s2])
    check(batch)
    bank.select(batch, compact_order([True, True, False, True, True, False]))  # s2's rows leave
    bank.remove(s2)  # before any forward without it: the kept group weights still hold g2 for slot s2
    del by_slot[s2]
    replacement = _adapter("other", 3, ("p", "q"), seed=99)
    assert bank.add(replacement).slot == s2  # the freed slot, now another adapter
    by_slot[s2] = replacement
    bank.extend(batch, bank.batch([s2, s2]))
    check(batch)  # the replacement's weights, not g2's
    assert sorted(batch.slots) == sorted([s0, s0, s1, s1, s2, s2])
    bank.select(batch, compact_order([s != s0 for s in batch.slots]))  # s0's rows leave
    check(batch)
    assert sorted(batch._groups[model.p].slots) == sorted([s1, s2])  # exactly the adapters still present


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
