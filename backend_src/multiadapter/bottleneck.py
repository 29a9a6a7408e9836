"""Bottleneck adapters (AdapterHub `seq_bn` / `double_seq_bn` / `par_bn`) by slot, at a block's residual adds.

A `BankedBottleneck` owns one place of the base model: the attention output or the feed-forward output
of one decoder layer. It holds that place's share of the bank by slot and is attached with two hooks,
never by replacing modules (so LoRA module names stay valid): a pre-hook on the norm that opens the
sub-block records the residual stream `r`, and a hook on the sub-block (attention or MLP) adds a delta to
the routed rows of its output `h`. The hooks are registered only while a batch routes rows here, so base
and LoRA-only batches run the bare modules. The base sub-block runs once for the whole batch; the adapter
math runs only on the rows of the adapters stored here, grouped by `BottleneckForm`, each group at the
width of its own widest routed adapter.

The layer itself then adds `r`, so a row's delta is `out - r - h`, where `out` is exactly what
AdapterHub's `BottleneckLayer` returns for that row (its models pass no layer norm there). Terms of
`h` and `r` that cancel are never computed: for the three presets the delta is the adapter's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN

from .batch_rows import Rows

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

    @property
    def reads_output(self) -> bool:
        """Whether the delta depends on the sub-block output h (a parallel adapter reads only r)."""
        return not self.parallel

    @property
    def reads_residual(self) -> bool:
        """Whether the delta depends on the residual stream r."""
        return self.parallel or self.original_ln_before or not self.original_ln_after


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
    """Weights of the rows of one group, gathered once per batch at the group's width m.

    Shared by every row of the group: down_t [H, m], down_b [m], up_t [m, H], up_b [H], ln_w / ln_b [H];
    or one per row: down_t [n, H, m], down_b [n, 1, m], up_t [n, m, H], up_b, ln_w, ln_b [n, 1, H].
    ln_w / ln_b are None unless the form has `ln_after`.
    """

    down_t: torch.Tensor
    down_b: torch.Tensor
    up_t: torch.Tensor
    up_b: torch.Tensor
    ln_w: torch.Tensor | None = None
    ln_b: torch.Tensor | None = None


@cache
def activation(name: str):
    """AdapterHub's `Activation_Function_Class`: transformers' ACT2FN by lower-case name, plus `leakyrelu`."""
    name = name.lower()
    if name == "leakyrelu":
        return F.leaky_relu
    return ACT2FN[name]


def is_known_activation(name: str) -> bool:
    return name.lower() == "leakyrelu" or name.lower() in ACT2FN


def bottleneck_delta(
    form: BottleneckForm, h: torch.Tensor | None, r: torch.Tensor | None, w: GatheredBottleneck
) -> torch.Tensor:
    """What rows whose adapters share `form` add to the sub-block output, before the layer's `+ r`.

    Shapes: h (sub-block output) and r (residual stream entering the sub-block) [n, T, H], either None
    when the form does not read it (`reads_output` / `reads_residual`); `w` as in GatheredBottleneck.
    Returns [n, T, H].

    Semantics, for each row i with slot s = slot[i] (scale folded into U, u), delta[i] = out[i] - r[i] - h[i]:
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

    # The coefficient of r left in the delta once `out - r - h` is simplified: -1, 0 or +1.
    residual_is_x = form.original_ln_before and not form.residual_before_ln
    r_coefficient = int(residual_is_x and not form.parallel) - int(not form.original_ln_after)
    if form.parallel:
        delta = adapter(r)
        if form.ln_after:
            delta = layer_norm(delta)
    else:
        x = h + r if form.original_ln_before else h
        if form.ln_after and form.adapter_residual_before_ln:
            # The residual passes through the norm: nothing cancels, h comes back out explicitly.
            delta = layer_norm(adapter(x) + (x if residual_is_x else h)) - h
            r_coefficient = -int(not form.original_ln_after)
        else:
            delta = adapter(x)
            if form.ln_after:
                delta = layer_norm(delta)
    if r_coefficient > 0:
        return delta + r
    if r_coefficient < 0:
        return delta - r
    return delta


@dataclass(frozen=True)
class BottleneckGroup:
    """Rows of the batch whose adapters here share one form (None: all rows)."""

    form: BottleneckForm
    rows: Rows | None
    weights: GatheredBottleneck


_STORAGE_TENSORS = ("down_t", "down_b", "up_t", "up_b", "ln_w", "ln_b")


class FormStorage:
    """The adapters of one form at one place, by storage row, zero-padded to the widest of them (an
    adapter of this form computes exactly its own product at any larger width).

    down_t [n_local, H, m], down_b [n_local, m], up_t [n_local, m, H], up_b / ln_w / ln_b [n_local, H].
    `local_of_slot` maps bank slots to storage rows, `width_of_slot` gives each slot's own width.
    """

    def __init__(self, hidden_size: int, like: torch.Tensor):
        h = hidden_size
        self.down_t = like.new_zeros(0, h, 0)
        self.down_b = like.new_zeros(0, 0)
        self.up_t = like.new_zeros(0, 0, h)
        self.up_b = like.new_zeros(0, h)
        self.ln_w = like.new_zeros(0, h)
        self.ln_b = like.new_zeros(0, h)
        self.local_of_slot: dict[int, int] = {}
        self.width_of_slot: dict[int, int] = {}

    def store(self, slot: int, weights: BottleneckWeights) -> None:
        m = weights.size
        if m > self.down_t.shape[2]:
            pad = m - self.down_t.shape[2]
            self.down_t = F.pad(self.down_t, (0, pad))
            self.down_b = F.pad(self.down_b, (0, pad))
            self.up_t = F.pad(self.up_t, (0, 0, 0, pad))
        local = self.local_of_slot.get(slot)
        if local is None:
            used = set(self.local_of_slot.values())
            local = next((i for i in range(self.down_t.shape[0]) if i not in used), self.down_t.shape[0])
            if local == self.down_t.shape[0]:
                for name in _STORAGE_TENSORS:
                    buffer = getattr(self, name)
                    setattr(self, name, torch.cat([buffer, buffer.new_zeros(1, *buffer.shape[1:])]))
        for name in _STORAGE_TENSORS:
            getattr(self, name)[local].zero_()
        self.down_t[local, :, :m] = weights.down.t().to(self.down_t)
        self.down_b[local, :m] = weights.down_bias.to(self.down_b)
        self.up_t[local, :m, :] = weights.up_scaled.t().to(self.up_t)
        self.up_b[local] = weights.up_bias_scaled.to(self.up_b)
        if weights.ln_after_weight is not None and weights.ln_after_bias is not None:
            self.ln_w[local] = weights.ln_after_weight.to(self.ln_w)
            self.ln_b[local] = weights.ln_after_bias.to(self.ln_b)
        self.local_of_slot[slot] = local
        self.width_of_slot[slot] = m

    def drop(self, slot: int) -> None:
        self.local_of_slot.pop(slot, None)
        self.width_of_slot.pop(slot, None)

    def gather(self, slots: list[int], with_norm: bool) -> GatheredBottleneck:
        """The weights of `slots` (one per routed row) at m = the widest of them, shaped as in
        GatheredBottleneck: shared when every slot is the same adapter, else one per row."""
        m = max(self.width_of_slot[s] for s in slots)
        locals_ = [self.local_of_slot[s] for s in slots]
        down_t, down_b, up_t = self.down_t[:, :, :m], self.down_b[:, :m], self.up_t[:, :m]
        if len(set(locals_)) == 1:
            k = locals_[0]
            norm = (self.ln_w[k], self.ln_b[k]) if with_norm else (None, None)
            return GatheredBottleneck(down_t[k].contiguous(), down_b[k], up_t[k], self.up_b[k], *norm)
        index = torch.tensor(locals_, device=self.down_t.device)

        def rows(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)[:, None, :]

        norm = (rows(self.ln_w), rows(self.ln_b)) if with_norm else (None, None)
        return GatheredBottleneck(
            down_t.index_select(0, index), rows(down_b), up_t.index_select(0, index), rows(self.up_b), *norm
        )


class BankedBottleneck(nn.Module):
    """This place's share of the bank, by slot: one `FormStorage` per form stored here.

    `form_of_slot` holds each slot's form. `route` holds the current batch's groups (None: no routed row),
    and the hooks on the norm and sub-block given to `attach` are registered only while it is set.
    """

    def __init__(self, place: BottleneckPlace, hidden_size: int, like: torch.Tensor):
        super().__init__()
        self.place = place
        self.hidden_size = int(hidden_size)
        self._like = like.new_zeros(())
        self.storage: dict[BottleneckForm, FormStorage] = {}
        self.form_of_slot: dict[int, BottleneckForm] = {}
        self._route: tuple[BottleneckGroup, ...] | None = None
        self._residual: torch.Tensor | None = None
        self._hooked: tuple[nn.Module, nn.Module] | None = None
        self._handles: tuple = ()

    def attach(self, norm: nn.Module, block: nn.Module) -> None:
        """Serve the residual add after `block`, whose residual stream is the input of `norm`."""
        self._hooked = (norm, block)
        self.route = self._route

    @property
    def route(self) -> tuple[BottleneckGroup, ...] | None:
        return self._route

    @route.setter
    def route(self, route: tuple[BottleneckGroup, ...] | None) -> None:
        if route is None and self._route is None and not self._handles:
            return  # unrouted and unhooked already: the common case, kept cheap (set twice per step)
        self._route = route
        if route is None:
            for handle in self._handles:
                handle.remove()
            self._handles = ()
            self._residual = None
        elif not self._handles and self._hooked is not None:
            norm, block = self._hooked
            self._handles = (
                norm.register_forward_pre_hook(self.capture_residual),
                block.register_forward_hook(self.rewrite_output),
            )

    def store(self, slot: int, weights: BottleneckWeights) -> None:
        """Store one adapter's weights at this place for `slot`."""
        h, m = self.hidden_size, weights.size
        if weights.down.shape != (m, h) or weights.up_scaled.shape != (h, m):
            raise ValueError(
                f"shape mismatch: down {tuple(weights.down.shape)}, up {tuple(weights.up_scaled.shape)}"
            )
        if self.form_of_slot.get(slot, weights.form) != weights.form:
            self.drop(slot)
        storage = self.storage.get(weights.form)
        if storage is None:
            storage = self.storage[weights.form] = FormStorage(h, self._like)
        storage.store(slot, weights)
        self.form_of_slot[slot] = weights.form

    def drop(self, slot: int) -> None:
        """Forget the adapter of `slot`; its storage row is reused by the next store of its form."""
        form = self.form_of_slot.pop(slot, None)
        if form is None:
            return
        storage = self.storage[form]
        storage.drop(slot)
        if not storage.local_of_slot:
            del self.storage[form]

    def make_route(self, slots: list[int]) -> tuple[BottleneckGroup, ...] | None:
        """Groups for a batch whose row i uses bank slot slots[i]; None when no row has an adapter here."""
        rows_of_form: dict[BottleneckForm, list[int]] = {}
        for i, slot in enumerate(slots):
            form = self.form_of_slot.get(slot)
            if form is not None:
                rows_of_form.setdefault(form, []).append(i)
        if not rows_of_form:
            return None
        groups = []
        for form, rows in rows_of_form.items():
            weights = self.storage[form].gather([slots[i] for i in rows], with_norm=form.ln_after)
            all_rows = len(rows) == len(slots)
            row_index = None if all_rows else Rows.of(rows, self._like.device)
            groups.append(BottleneckGroup(form, row_index, weights))
        return tuple(groups)

    def capture_residual(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook on the norm that opens the sub-block: its input is the residual stream r."""
        self._residual = args[0]

    def rewrite_output(self, module: nn.Module, args: tuple, output):
        """Forward hook on the sub-block: routed rows get their delta added (one copy of the output)."""
        route, residual = self._route, self._residual
        self._residual = None
        if route is None or residual is None:
            return None
        h = output[0] if isinstance(output, tuple) else output
        result = None
        for group in route:
            form, rows = group.form, group.rows
            if rows is None:  # the only group: every row
                result = h + bottleneck_delta(form, h, residual, group.weights)
                break
            h_rows = rows.take(h) if form.reads_output else None
            r_rows = rows.take(residual) if form.reads_residual else None
            delta = bottleneck_delta(form, h_rows, r_rows, group.weights)
            result = rows.add_into(h.clone() if result is None else result, delta)
        return (result, *output[1:]) if isinstance(output, tuple) else result
