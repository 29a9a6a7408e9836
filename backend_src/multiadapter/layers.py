"""A frozen base linear layer plus per-row LoRA deltas read from bank storage.

The bank writes adapter weights into each wrapped layer's storage by slot; before a forward pass it
installs a `Route` saying which batch rows use which stored adapter. The forward computes the base
layer once for the whole batch and adds the low-rank deltas only to the rows whose adapter targets
this layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch_rows import Rows


def lora_delta(x: torch.Tensor, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Low-rank update of rows of activations.

    Shapes: x [n, T, in]; a_t [in, r] (one adapter for all rows) or [n, in, r] (one per row);
    b_t [r, out] or [n, r, out], with the scale already folded into b_t. Returns [n, T, out].

    Semantics: delta[i] = (x[i] @ a_t[i]) @ b_t[i]  ==  s * (x[i] @ A[slot[i]].T) @ B[slot[i]].T
    """
    return torch.matmul(torch.matmul(x, a_t), b_t)


@dataclass(frozen=True)
class Route:
    """Which rows of the batch this layer adapts, with their weights gathered once per batch.

    rows: the n adapted rows of the batch, or None when every row is adapted.
    a_t: [in, r] shared by all adapted rows, or [n, in, r]; b_t: [r, out] or [n, r, out].
    """

    rows: Rows | None
    a_t: torch.Tensor
    b_t: torch.Tensor

    def delta(self, x: torch.Tensor) -> tuple[Rows | None, torch.Tensor]:
        """x: [B, T, in] -> (rows, delta [n, T, out]): the deltas of the adapted rows."""
        rows = x if self.rows is None else self.rows.take(x)
        return self.rows, lora_delta(rows.to(self.a_t.dtype), self.a_t, self.b_t)


@dataclass(frozen=True)
class GroupedRoute:
    """The adapted rows grouped by adapter, so that each adapter's weights are read once per forward
    (a per-row route reads them once per row).

    a_t: [D, in, r], b_t: [D, r, out]: the D adapters present, r the largest of their ranks (not the bank's).
    grid: [D * G] batch rows, group d's rows at d*G .. d*G + G - 1; a group smaller than G repeats its first
    row (computed, never added). take: [n] the grid positions of the adapted rows (None: no repeats);
    rows: those rows of the batch, in the same order.
    """

    grid: torch.Tensor
    take: torch.Tensor | None
    rows: Rows
    a_t: torch.Tensor
    b_t: torch.Tensor

    def delta(self, x: torch.Tensor) -> tuple[Rows, torch.Tensor]:
        """x: [B, T, in] -> (rows, delta [n, T, out])."""
        groups, tokens = self.a_t.shape[0], x.shape[1]
        xs = x.index_select(0, self.grid).to(self.a_t.dtype)  # [D * G, T, in]
        xs = xs.view(groups, -1, x.shape[2])  # [D, G * T, in]
        delta = torch.bmm(torch.bmm(xs, self.a_t), self.b_t).view(-1, tokens, self.b_t.shape[2])
        return self.rows, delta if self.take is None else delta.index_select(0, self.take)


class BankedLinear(nn.Module):
    """Wraps an `nn.Linear` or GPT-2 `Conv1D`; holds this layer's share of the adapter bank.

    Storage: a_t [n_local, in, r_max], b_t [n_local, r_max, out]; rank padding is zero, so an adapter
    of a smaller rank computes exactly its own product. `local_of_slot` maps bank slots to rows of the
    storage; slots of adapters that do not target this layer are absent.
    """

    def __init__(self, base: nn.Module, dtype: torch.dtype | None = None):
        """dtype: of the LoRA storage and deltas (None: the base weight's; float32 over a quantized layer,
        whose weight is packed integers)."""
        super().__init__()
        if isinstance(base, nn.Linear):
            in_features, out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_features, out_features = base.weight.shape
        else:
            raise TypeError(f"cannot adapt a {type(base).__name__}")
        self.base = base
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        weight = base.weight
        # A bitsandbytes layer (Linear4bit / Linear8bitLt) is an nn.Linear whose weight holds integers.
        self.quantized = not weight.dtype.is_floating_point
        if dtype is None:
            dtype = torch.float32 if self.quantized else weight.dtype
        kwargs = {"dtype": dtype, "device": weight.device}
        self.register_buffer("a_t", torch.zeros(0, self.in_features, 0, **kwargs), persistent=False)
        self.register_buffer("b_t", torch.zeros(0, 0, self.out_features, **kwargs), persistent=False)
        self.local_of_slot: dict[int, int] = {}
        self.rank_of_slot: dict[int, int] = {}
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> adapter_weights(slot)
        self._stores = 0
        self._generation_of_slot: dict[int, int] = {}  # which store put the slot's current adapter here
        self.route: Route | GroupedRoute | None = None
        self.layout = 0  # bumped when the storage's rank grows (per-row weights made before no longer fit)

    @property
    def max_rank(self) -> int:
        return int(self.a_t.shape[2])

    def store(self, slot: int, a: torch.Tensor, b_scaled: torch.Tensor) -> None:
        """Store an adapter for `slot`. a: [r, in]; b_scaled: [out, r] (scale folded in)."""
        rank = a.shape[0]
        if a.shape != (rank, self.in_features) or b_scaled.shape != (self.out_features, rank):
            raise ValueError(f"shape mismatch: A {tuple(a.shape)}, B {tuple(b_scaled.shape)}")
        if rank > self.max_rank:
            pad = rank - self.max_rank
            self.a_t = nn.functional.pad(self.a_t, (0, pad))
            self.b_t = nn.functional.pad(self.b_t, (0, 0, 0, pad))
            self.layout += 1
        local = self.local_of_slot.get(slot)
        if local is None:
            used = set(self.local_of_slot.values())
            free = [i for i in range(self.a_t.shape[0]) if i not in used]
            if free:
                local = free[0]
            else:
                local = self.a_t.shape[0]
                self.a_t = torch.cat([self.a_t, self.a_t.new_zeros(1, *self.a_t.shape[1:])])
                self.b_t = torch.cat([self.b_t, self.b_t.new_zeros(1, *self.b_t.shape[1:])])
        self.a_t[local].zero_()
        self.b_t[local].zero_()
        self.a_t[local, :, :rank] = a.t().to(self.a_t)
        self.b_t[local, :rank, :] = b_scaled.t().to(self.b_t)
        self.local_of_slot[slot] = local
        self.rank_of_slot[slot] = int(rank)
        self._views.clear()  # the storage may have been reallocated
        self._stores += 1
        self._generation_of_slot[slot] = self._stores

    def drop(self, slot: int) -> None:
        """Forget the adapter of `slot`; its storage row is zeroed and reused by the next store."""
        local = self.local_of_slot.pop(slot, None)
        self.rank_of_slot.pop(slot, None)
        self._views.pop(slot, None)
        if local is not None:
            self.a_t[local].zero_()
            self.b_t[local].zero_()

    def generation(self, slot: int) -> int:
        """Which store put `slot`'s current adapter in this layer (0: none): copies made of an older one are
        stale."""
        return self._generation_of_slot.get(slot, 0) if slot in self.local_of_slot else 0

    def adapter_weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored adapter of `slot` at its own rank r: views a [in, r], b [r, out] (made once)."""
        views = self._views.get(slot)
        if views is None:
            local, rank = self.local_of_slot[slot], self.rank_of_slot[slot]
            views = self._views[slot] = (self.a_t[local, :, :rank], self.b_t[local, :rank])
        return views

    def row_weights(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row weights for a batch whose row i uses bank slot slots[i]: a [n, in, r_max],
        b [n, r_max, out]; zero for rows whose slot this layer does not adapt."""
        n = len(slots)
        a = self.a_t.new_zeros(n, *self.a_t.shape[1:])
        b = self.b_t.new_zeros(n, *self.b_t.shape[1:])
        rows = [i for i, slot in enumerate(slots) if slot in self.local_of_slot]
        if rows:
            device = self.a_t.device
            index = torch.tensor(rows, device=device)
            local = torch.tensor([self.local_of_slot[slots[i]] for i in rows], device=device)
            a.index_copy_(0, index, self.a_t.index_select(0, local))
            b.index_copy_(0, index, self.b_t.index_select(0, local))
        return a, b

    def make_route(self, slots: list[int]) -> Route | None:
        """Route for a batch whose row i uses bank slot slots[i] (the base sentinel maps to nothing)."""
        rows = [i for i, slot in enumerate(slots) if slot in self.local_of_slot]
        if not rows:
            return None
        locals_ = [self.local_of_slot[slots[i]] for i in rows]
        device = self.a_t.device
        row_index = None if len(rows) == len(slots) else Rows.of(rows, device)
        if len(set(locals_)) == 1:
            return Route(row_index, *self.adapter_weights(slots[rows[0]]))
        index = torch.tensor(locals_, device=device)
        return Route(row_index, self.a_t.index_select(0, index), self.b_t.index_select(0, index))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, in] -> [B, T, out]: the base layer for all rows plus the routed LoRA deltas.

        When the LoRA storage's dtype differs from the activations' (float32 deltas over a bf16 or quantized
        base), rows are cast in, and the sum rounded as PEFT does: over a quantized layer the delta is cast to
        the output's dtype and added (PEFT's bitsandbytes layers), over a float layer the two are added in the
        delta's dtype and the sum cast (PEFT's Linear). Equal dtypes make both casts no-ops.
        """
        y = self.base(x)
        route = self.route
        if route is None:
            return y
        if (
            route.rows is None
            and route.a_t.dim() == 2
            and route.a_t.dtype == y.dtype
            and not self.quantized
            and y.is_contiguous()
        ):
            # One adapter for every row: y += (x @ a_t) @ b_t, the expand accumulating straight into y.
            shrunk = torch.mm(x.reshape(-1, self.in_features), route.a_t)
            y.view(-1, self.out_features).addmm_(shrunk, route.b_t)
            return y
        rows, delta = route.delta(x)
        if self.quantized or delta.dtype == y.dtype:
            delta = delta.to(y.dtype)
            # y is this forward's own output: adding in place is safe and spares a copy.
            return y.add_(delta) if rows is None else rows.add_into(y, delta)
        if rows is None:
            return (y + delta).to(y.dtype)
        return rows.copy_into(y, (rows.take(y) + delta).to(y.dtype))
