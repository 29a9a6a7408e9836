"""Bottleneck adapters (AdapterHub `seq_bn` / `double_seq_bn` / `par_bn`) by slot, at a block's residual adds.

A `BankedBottleneck` owns one place of the base model: the attention output or the feed-forward output
of one decoder layer. It holds that place's share of the bank by slot and is attached with two hooks,
never by replacing modules (so LoRA module names stay valid): a pre-hook on the norm that opens the
sub-block records the residual stream `r`, and a hook on the sub-block (attention or MLP) rewrites the
routed rows of its output `h`. The base sub-block runs once for the whole batch; the adapter math
runs only on the rows of the adapters stored here, grouped by `BottleneckForm`.

The layer itself then adds `r`, so a row's sub-block output becomes `out - r`, where `out` is exactly
what AdapterHub's `BottleneckLayer` returns for that row (its models pass no layer norm there).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

ATTENTION = "attention"  # AdapterHub `mh_adapter`, key infix `attention_adapters`
FFN = "ffn"  # AdapterHub `output_adapter`, key infix `output_adapters`
POSITIONS = (ATTENTION, FFN)
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which AdapterHub's adapter_norm_after uses


@dataclass(frozen=True)
class BottleneckForm:
    """The data flow of one adapter around one residual add (the config flags that change the math)."""

    parallel: bool
    original_ln_before: bool
    original_ln_after: bool
    residual_before_ln: bool
    adapter_residual_before_ln: bool
    ln_after: bool
    activation: str


@dataclass(frozen=True)
class BottleneckPlace:
    """Where a bottleneck sits: decoder layer `layer`, at `position` (ATTENTION or FFN)."""

    layer: int
    position: str


@dataclass(frozen=True)
class BottleneckWeights:
    """One adapter at one place. down [m, H], down_bias [m], up_scaled [H, m], up_bias_scaled [H]
    (AdapterHub's `scaling`, scalar or per channel, folded into both); ln_after weight / bias [H] or None."""

    form: BottleneckForm
    down: torch.Tensor
    down_bias: torch.Tensor
    up_scaled: torch.Tensor
    up_bias_scaled: torch.Tensor
    ln_after_weight: torch.Tensor | None = None
    ln_after_bias: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.down.shape[0])

    @property
    def nbytes(self) -> int:
        tensors = (self.down, self.down_bias, self.up_scaled, self.up_bias_scaled)
        extra = (self.ln_after_weight, self.ln_after_bias)
        return sum(t.nbytes for t in tensors) + sum(t.nbytes for t in extra if t is not None)


@dataclass(frozen=True)
class GatheredBottleneck:
    """Weights of the rows of one group, gathered once per batch.

    Shared by every row of the group: down_t [H, m], down_b [m], up_t [m, H], up_b [H], ln_w / ln_b [H];
    or one per row: down_t [n, H, m], down_b [n, 1, m], up_t [n, m, H], up_b, ln_w, ln_b [n, 1, H].
    """

    down_t: torch.Tensor
    down_b: torch.Tensor
    up_t: torch.Tensor
    up_b: torch.Tensor
    ln_w: torch.Tensor
    ln_b: torch.Tensor


@cache
def activation(name: str):
    """AdapterHub's `Activation_Function_Class`: transformers' ACT2FN by lower-case name, plus `leakyrelu`."""
    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    return ACT2FN[name]


def is_known_activation(name: str) -> bool:
    return name.lower() == "leakyrelu" or name.lower() in ACT2FN


def bottleneck_output(
    form: BottleneckForm, h: torch.Tensor, r: torch.Tensor, w: GatheredBottleneck
) -> torch.Tensor:
    """What replaces the residual add `h + r` for rows whose adapters share `form`.

    Shapes: h (sub-block output) and r (residual stream entering the sub-block) [n, T, H]; `w` as in
    GatheredBottleneck. Returns [n, T, H].

    Semantics, for each row i with slot s = slot[i] (scale folded into U, u):
      a(z) = act(z @ D[s].T + d[s]) @ U[s].T + u[s]
      parallel:   out[i] = LN?(a(r[i])) + h[i] + (r[i] if original_ln_after)
      sequential: x = h[i] + r[i] if original_ln_before else h[i];  res = h[i] if residual_before_ln else x
                  o = a(x) + res, with LN_after around the sum (adapter_residual_before_ln) or around a(x)
                  out[i] = o + r[i] if original_ln_after else o
    """
    act = activation(form.activation)

    def adapter(z: torch.Tensor) -> torch.Tensor:
        return torch.matmul(act(torch.matmul(z, w.down_t) + w.down_b), w.up_t) + w.up_b

    def layer_norm(z: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(z, z.shape[-1:], eps=LAYER_NORM_EPS) * w.ln_w + w.ln_b

    if form.parallel:
        up = adapter(r)
        if form.ln_after:
            up = layer_norm(up)
        out = up + h
        return out + r if form.original_ln_after else out
    x = h + r if form.original_ln_before else h
    residual = h if form.residual_before_ln else x
    up = adapter(x)
    if not form.ln_after:
        out = up + residual
    elif form.adapter_residual_before_ln:
        out = layer_norm(up + residual)
    else:
        out = layer_norm(up) + residual
    return out + r if form.original_ln_after else out


@dataclass(frozen=True)
class BottleneckGroup:
    """Rows of the batch whose adapters here share one form. rows: [n] batch indices, or None for all rows."""

    form: BottleneckForm
    rows: torch.Tensor | None
    weights: GatheredBottleneck


class BankedBottleneck(nn.Module):
    """This place's share of the bank, by slot.

    Storage, padded with zeros so a narrower adapter computes exactly its own product: down_t [n_local, H, m],
    down_b [n_local, m], up_t [n_local, m, H], up_b / ln_w / ln_b [n_local, H], with m the widest stored.
    `local_of_slot` maps bank slots to storage rows; `form_of_slot` holds each slot's form.
    """

    def __init__(self, place: BottleneckPlace, hidden_size: int, like: torch.Tensor):
        super().__init__()
        self.place = place
        self.hidden_size = int(hidden_size)
        h = self.hidden_size
        self.register_buffer("down_t", like.new_zeros(0, h, 0), persistent=False)
        self.register_buffer("down_b", like.new_zeros(0, 0), persistent=False)
        self.register_buffer("up_t", like.new_zeros(0, 0, h), persistent=False)
        self.register_buffer("up_b", like.new_zeros(0, h), persistent=False)
        self.register_buffer("ln_w", like.new_zeros(0, h), persistent=False)
        self.register_buffer("ln_b", like.new_zeros(0, h), persistent=False)
        self.local_of_slot: dict[int, int] = {}
        self.form_of_slot: dict[int, BottleneckForm] = {}
        self.route: tuple[BottleneckGroup, ...] | None = None
        self._residual: torch.Tensor | None = None

    @property
    def max_size(self) -> int:
        return int(self.down_t.shape[2])

    def store(self, slot: int, weights: BottleneckWeights) -> None:
        """Store one adapter's weights at this place for `slot`."""
        h, m = self.hidden_size, weights.size
        if weights.down.shape != (m, h) or weights.up_scaled.shape != (h, m):
            raise ValueError(
                f"shape mismatch: down {tuple(weights.down.shape)}, up {tuple(weights.up_scaled.shape)}"
            )
        if m > self.max_size:
            pad = m - self.max_size
            self.down_t = F.pad(self.down_t, (0, pad))
            self.down_b = F.pad(self.down_b, (0, pad))
            self.up_t = F.pad(self.up_t, (0, 0, 0, pad))
        local = self.local_of_slot.get(slot)
        if local is None:
            used = set(self.local_of_slot.values())
            local = next((i for i in range(self.down_t.shape[0]) if i not in used), self.down_t.shape[0])
            if local == self.down_t.shape[0]:
                for name in ("down_t", "down_b", "up_t", "up_b", "ln_w", "ln_b"):
                    buffer = getattr(self, name)
                    setattr(self, name, torch.cat([buffer, buffer.new_zeros(1, *buffer.shape[1:])]))
        for buffer in (self.down_t, self.down_b, self.up_t, self.up_b, self.ln_w, self.ln_b):
            buffer[local].zero_()
        self.down_t[local, :, :m] = weights.down.t().to(self.down_t)
        self.down_b[local, :m] = weights.down_bias.to(self.down_b)
        self.up_t[local, :m, :] = weights.up_scaled.t().to(self.up_t)
        self.up_b[local] = weights.up_bias_scaled.to(self.up_b)
        if weights.ln_after_weight is not None and weights.ln_after_bias is not None:
            self.ln_w[local] = weights.ln_after_weight.to(self.ln_w)
            self.ln_b[local] = weights.ln_after_bias.to(self.ln_b)
        self.local_of_slot[slot] = local
        self.form_of_slot[slot] = weights.form

    def drop(self, slot: int) -> None:
        """Forget the adapter of `slot`; its storage row is reused by the next store."""
        self.local_of_slot.pop(slot, None)
        self.form_of_slot.pop(slot, None)

    def make_route(self, slots: list[int]) -> tuple[BottleneckGroup, ...] | None:
        """Groups for a batch whose row i uses bank slot slots[i]; None when no row has an adapter here."""
        rows_of_form: dict[BottleneckForm, list[int]] = {}
        for i, slot in enumerate(slots):
            form = self.form_of_slot.get(slot)
            if form is not None:
                rows_of_form.setdefault(form, []).append(i)
        if not rows_of_form:
            return None
        device = self.down_t.device
        groups = []
        for form, rows in rows_of_form.items():
            locals_ = [self.local_of_slot[slots[i]] for i in rows]
            row_index = None if len(rows) == len(slots) else torch.tensor(rows, device=device)
            if len(set(locals_)) == 1:
                k = locals_[0]
                weights = GatheredBottleneck(
                    self.down_t[k], self.down_b[k], self.up_t[k], self.up_b[k], self.ln_w[k], self.ln_b[k]
                )
            else:
                index = torch.tensor(locals_, device=device)
                weights = GatheredBottleneck(
                    self.down_t.index_select(0, index),
                    self.down_b.index_select(0, index)[:, None, :],
                    self.up_t.index_select(0, index),
                    self.up_b.index_select(0, index)[:, None, :],
                    self.ln_w.index_select(0, index)[:, None, :],
                    self.ln_b.index_select(0, index)[:, None, :],
                )
            groups.append(BottleneckGroup(form, row_index, weights))
        return tuple(groups)

    def capture_residual(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the norm that opens the sub-block: its input is the residual stream r."""
        if self.route is not None:
            self._residual = args[0]

    def rewrite_output(self, module: nn.Module, args: tuple, output):
        """Forward hook on the sub-block: routed rows get `out - r`, so the layer's own `+ r` yields `out`."""
        route, residual = self.route, self._residual
        self._residual = None
        if route is None or residual is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        result = h
        for group in route:
            if group.rows is None:
                result = bottleneck_output(group.form, h, residual, group.weights) - residual
                continue
            h_rows, r_rows = h.index_select(0, group.rows), residual.index_select(0, group.rows)
            rows_out = bottleneck_output(group.form, h_rows, r_rows, group.weights) - r_rows
            result = result.index_copy(0, group.rows, rows_out)
        return (result, *output[1:]) if isinstance(output, tuple) else result
