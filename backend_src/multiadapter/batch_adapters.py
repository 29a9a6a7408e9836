"""Which adapter each row of a running batch uses, and the weights every adapted layer reads for it.

A decode step with rows on many different LoRA adapters multiplies each row by its own adapter's matrices:
one batched matmul over per-row weights [B, in, r] and [B, r, out]. Gathering those from the bank's storage
copies every row's adapter (all layers) and used to happen each time a row joined or left, which in continuous
batching is nearly every step. `BatchAdapters` keeps the per-row weights from step to step instead, in
buffers ordered like the batch's rows:

- a row that joins copies its adapter in once (`extend`);
- a row that leaves costs nothing when the caller keeps the survivors in place and moves rows from the
  tail into the holes (`compact_order`): only the moved rows are copied (`select`);
- the routes every layer reads (views of the buffers) are made once per change of the rows, not per step.

Per layer (see `_route_for`): no adapted row -> no route; all adapted rows on one adapter -> that adapter's
weights, shared (no per-row weights at all, at its own rank); adapters with many rows each (`should_group`)
-> the adapted rows grouped by adapter (`GroupedRoute`: each adapter's weights, kept while the adapters stay
present, read once per forward instead of once per row, at the largest rank present rather than the
bank's); few adapted rows (under half) -> those rows' weights gathered; otherwise the kept per-row buffers,
with zero weights for rows that layer does not adapt (adding an exact 0).
Bottleneck places are routed by their own groups (`BankedBottleneck.make_route`), remade on each change.

Not thread-safe by itself: the bank's lock guards every method (the bank calls them, or holds the lock).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .batch_rows import Rows
from .layers import BankedLinear, GroupedRoute, Route


def compact_order(alive: Sequence[bool]) -> list[int]:
    """The rows to keep, as a new order that moves as few rows as possible: survivors stay where they are and
    the survivors at the tail fill the holes. new row i is old row result[i]."""
    n = sum(1 for a in alive if a)
    tail = [i for i in range(n, len(alive)) if alive[i]]
    order = []
    for i in range(n):
        order.append(i if alive[i] else tail.pop())
    return order


@dataclass(frozen=True)
class Moves:
    """Rows that change place in a `select`: (destination, source) pairs, as index tensors too."""

    pairs: list[tuple[int, int]]
    dst: torch.Tensor | None
    src: torch.Tensor | None
    disjoint: bool

    @classmethod
    def of(cls, order: Sequence[int], device: torch.device | None) -> Moves:
        pairs = [(i, j) for i, j in enumerate(order) if i != j]
        disjoint = not ({i for i, _ in pairs} & {j for _, j in pairs})
        if not pairs or disjoint or device is None:
            return cls(pairs, None, None, disjoint)
        return cls(
            pairs,
            torch.tensor([i for i, _ in pairs], device=device),
            torch.tensor([j for _, j in pairs], device=device),
            disjoint,
        )


@dataclass
class RowWeights:
    """One layer's per-row weights for a batch. a: [capacity, in, r_max], b: [capacity, r_max, out]; rows
    [:n] in batch order, zero where the layer does not adapt the row's adapter. `layout`: the layer's
    storage layout they were made for (a larger rank arriving changes it)."""

    a: torch.Tensor
    b: torch.Tensor
    n: int
    layout: int

    @classmethod
    def gather(cls, layer: BankedLinear, slots: Sequence[int]) -> RowWeights:
        a, b = layer.row_weights(slots)
        return cls(a, b, len(slots), layer.layout)

    def select(self, order: Sequence[int], moves: Moves) -> None:
        """Keep rows `order`; `moves` says which rows move where (the same for every layer)."""
        if moves.pairs:
            if moves.disjoint:  # a row read is never a row written: copy row by row, in place
                for dst, src in moves.pairs:
                    self.a[dst].copy_(self.a[src])
                    self.b[dst].copy_(self.b[src])
            else:
                self.a.index_copy_(0, moves.dst, self.a.index_select(0, moves.src))
                self.b.index_copy_(0, moves.dst, self.b.index_select(0, moves.src))
        self.n = len(order)

    def extend(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Append rows a: [k, in, r_max], b: [k, r_max, out]."""
        end = self.reserve(a.shape[0])
        self.a[self.n : end] = a
        self.b[self.n : end] = b
        self.n = end

    def extend_from(self, layer: BankedLinear, slots: Sequence[int]) -> None:
        """Append rows for `slots`, copied from `layer`'s storage straight into the buffers."""
        end = self.reserve(len(slots))
        for row, slot in zip(range(self.n, end), slots, strict=True):
            local = layer.local_of_slot.get(slot)
            if local is None:
                self.a[row].zero_()
                self.b[row].zero_()
            else:
                self.a[row].copy_(layer.a_t[local])
                self.b[row].copy_(layer.b_t[local])
        self.n = end

    def reserve(self, k: int) -> int:
        """Room for `k` more rows; the end of the rows after they are appended."""
        end = self.n + k
        if end > self.a.shape[0]:
            capacity = max(end, 2 * self.a.shape[0])
            grown_a = self.a.new_zeros(capacity, *self.a.shape[1:])
            grown_b = self.b.new_zeros(capacity, *self.b.shape[1:])
            grown_a[: self.n] = self.a[: self.n]
            grown_b[: self.n] = self.b[: self.n]
            self.a, self.b = grown_a, grown_b
        return end

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[: self.n], self.b[: self.n]


class BatchAdapters:
    """The bank slot of each row of one batch (`slots`), with the per-row weights its layers keep.

    Made by `AdapterBank.batch(slots)`; change it only through the bank's lock (`AdapterBank.routing` holds
    it; `select` / `extend` / `assign` are called through `AdapterBank`)."""

    def __init__(self, slots: Sequence[int]):
        self.slots = list(slots)
        self._weights: dict[BankedLinear, RowWeights] = {}
        self._groups: dict[BankedLinear, GroupWeights] = {}
        self._routes: list[object] | None = None
        self._epoch = -1  # the bank epoch the routes were made in

    def __len__(self) -> int:
        return len(self.slots)

    def assign(self, slots: Sequence[int]) -> None:
        """Other rows altogether: everything is remade on the next routing."""
        self.slots = list(slots)
        self._weights.clear()
        self._groups.clear()
        self._routes = None

    def select(self, order: Sequence[int]) -> None:
        """Keep rows `order` (new row i is old row order[i]); see `compact_order` for the cheap orders."""
        if list(order) == list(range(len(self.slots))):
            return
        self.slots = [self.slots[j] for j in order]
        if self._weights:
            moves = Moves.of(order, next(iter(self._weights.values())).a.device)
            for weights in self._weights.values():
                weights.select(order, moves)
        self._routes = None

    def extend(self, other: BatchAdapters) -> None:
        """Append `other`'s rows (its kept weights are copied where it has them, else gathered)."""
        for layer, weights in list(self._weights.items()):
            theirs = other._weights.get(layer)
            if weights.layout != layer.layout:
                del self._weights[layer]
            elif theirs is not None and theirs.layout == layer.layout:
                weights.extend(*theirs.rows())
            else:
                weights.extend_from(layer, other.slots)
        self.slots.extend(other.slots)
        self._routes = None

    def routes(self, layers: Sequence[BankedLinear], sites: Sequence[object], epoch: int) -> list[object]:
        """One route per layer, then one per bottleneck site (in the order given), remade only when the rows
        or the bank (`epoch`) changed since the last call."""
        if self._routes is None or self._epoch != epoch:
            kept: dict[BankedLinear, RowWeights] = {}
            groups: dict[BankedLinear, GroupWeights] = {}
            routes: list[object] = [self._route_for(layer, kept, groups) for layer in layers]
            routes += [site.make_route(self.slots) for site in sites]
            self._weights, self._groups, self._routes, self._epoch = kept, groups, routes, epoch
        return self._routes

    def _route_for(
        self,
        layer: BankedLinear,
        kept: dict[BankedLinear, RowWeights],
        groups: dict[BankedLinear, GroupWeights],
    ) -> Route | GroupedRoute | None:
        slots = self.slots
        adapted = [i for i, slot in enumerate(slots) if slot in layer.local_of_slot]
        if not adapted:
            return None
        device = layer.a_t.device
        rows = None if len(adapted) == len(slots) else Rows.of(adapted, device)
        members: dict[int, list[int]] = {}  # slot -> its rows
        for i in adapted:
            members.setdefault(slots[i], []).append(i)
        if len(members) == 1:
            (slot,) = members
            return Route(rows, *layer.adapter_weights(slot))
        if should_group([len(m) for m in members.values()]):
            weights = self._groups.get(layer) or GroupWeights(layer)
            weights.update(layer, list(members))
            groups[layer] = weights
            return weights.route(members, device)
        if 2 * len(adapted) < len(slots):
            return layer.make_route(slots)
        weights = self._weights.get(layer)
        if weights is None or weights.layout != layer.layout:
            weights = RowWeights.gather(layer, slots)
        kept[layer] = weights
        return Route(None, *weights.rows())


# Grouping pays when adapters have at least this many rows each on average. It reads each adapter's weights
# once instead of once per row, but costs two index operations per layer (a gather of the rows, a scatter of
# their deltas), which on a CPU cost more than reading a few rows' weights. Measured on the bench model (AMD
# EPYC, hidden 512, rank 16, decode step, grouped / per-row): 4 rows per adapter at B=32 1.10x faster with one
# torch thread and 1.02x with two; 2 rows per adapter 1.00x / 0.95x; one row per adapter among base rows
# (grouping only to skip zero weights) 0.96x with two threads. Rows a layer does not adapt therefore stay
# on the per-row path, with zero weights.
GROUP_MIN_ROWS_PER_ADAPTER = 4


def should_group(sizes: Sequence[int]) -> bool:
    """Group adapted rows on adapters with `sizes` rows each when they average GROUP_MIN_ROWS_PER_ADAPTER rows
    per adapter and padding to the largest group at most doubles the rows computed."""
    adapted = sum(sizes)
    return adapted >= GROUP_MIN_ROWS_PER_ADAPTER * len(sizes) and len(sizes) * max(sizes) <= 2 * adapted


class GroupWeights:
    """One layer's weights for the distinct adapters of a batch, kept from one change of the rows to the next:
    a [capacity, in, r], b [capacity, r, out], position i holding adapter `slots[i]` for i < len(slots); r is
    the largest rank among the adapters it has held (not the bank's).

    `update` makes it hold exactly a given set of adapters the way the per-row buffers keep rows: an adapter
    that arrives is copied in once, one that leaves costs a move of the last adapter into its hole. Each
    position remembers the layer's store generation of what it copied, so a slot that was freed and filled
    again by another adapter in between is copied afresh.
    """

    def __init__(self, layer: BankedLinear):
        self.a = layer.a_t.new_zeros(0, layer.in_features, 0)
        self.b = layer.b_t.new_zeros(0, 0, layer.out_features)
        self.slots: list[int] = []
        self._generations: list[int] = []

    def update(self, layer: BankedLinear, wanted: Sequence[int]) -> None:
        """Hold exactly the adapters of slots `wanted` (each stored in `layer`)."""
        wanted_set = set(wanted)
        current = {s for s, g in zip(self.slots, self._generations, strict=True) if g == layer.generation(s)}
        i = 0
        while i < len(self.slots):  # drop what left (or was replaced): the last position fills the hole
            if self.slots[i] in wanted_set and self.slots[i] in current:
                i += 1
                continue
            last = len(self.slots) - 1
            if i != last:
                self.a[i].copy_(self.a[last])
                self.b[i].copy_(self.b[last])
                self.slots[i], self._generations[i] = self.slots[last], self._generations[last]
            self.slots.pop()
            self._generations.pop()
        held = set(self.slots)
        for slot in wanted:
            if slot not in held:
                self._append(layer, slot)
                held.add(slot)

    def _append(self, layer: BankedLinear, slot: int) -> None:
        a, b = layer.adapter_weights(slot)  # [in, r], [r, out]
        n, rank = len(self.slots), a.shape[1]
        if n == self.a.shape[0] or rank > self.a.shape[2]:
            capacity = max(n + 1, 2 * self.a.shape[0]) if n == self.a.shape[0] else self.a.shape[0]
            width = max(rank, self.a.shape[2])
            grown_a = self.a.new_zeros(capacity, self.a.shape[1], width)
            grown_b = self.b.new_zeros(capacity, width, self.b.shape[2])
            grown_a[:n, :, : self.a.shape[2]] = self.a[:n]
            grown_b[:n, : self.b.shape[1]] = self.b[:n]
            self.a, self.b = grown_a, grown_b
        self.a[n].zero_()
        self.b[n].zero_()
        self.a[n, :, :rank] = a
        self.b[n, :rank] = b
        self.slots.append(slot)
        self._generations.append(layer.generation(slot))

    def route(self, members: dict[int, list[int]], device: torch.device) -> GroupedRoute:
        """The route for the batch rows `members[slot]` of each adapter held (exactly those: see `update`)."""
        groups = [members[slot] for slot in self.slots]
        size = max(len(m) for m in groups)
        grid = [m[i] if i < len(m) else m[0] for m in groups for i in range(size)]
        take = [g * size + i for g, m in enumerate(groups) for i in range(len(m))]
        rows = [r for m in groups for r in m]
        padded = len(take) < len(grid)
        n = len(self.slots)
        return GroupedRoute(
            grid=torch.tensor(grid, device=device),
            take=torch.tensor(take, device=device) if padded else None,
            rows=Rows.of(rows, device),
            a_t=self.a[:n],
            b_t=self.b[:n],
        )
