"""Continuous batching: sequences join and leave a running batch at every step of one decode loop.

A `Scheduler` owns the model's time (it is driven by one thread, see `loop.py`). Each `step()`:

1. retires sequences cancelled since the last step;
2. admits waiting sequences, first come first served across adapters, into a prefill group, within a row
   limit and a KV-token budget (a sequence reserves its prompt plus its `max_new_tokens`). A sequence that
   does not fit blocks the ones behind it until rows leave, so the oldest is always admitted first and
   nothing starves;
3. runs the next chunk of the prefill group (at most `prefill_chunk` prompt positions per step, so a long
   prompt shares the steps with the running rows instead of stalling them). After its last chunk each row
   samples its first token and the group joins the running batch: both caches are left-padded to the longer
   length and concatenated by row. Running rows are copied, never recomputed;
4. runs one decode forward for every running row (the row's last token), samples each row's next token with
   its own parameters and generator, and retires the rows that stopped (the survivors stay in place and rows
   from the tail fill the holes, so the batch's per-row adapter weights move as little as possible:
   batch_adapters.py);
5. drops the cache columns that only padding uses once the longest row has left.

The KV cache is the model's own `DynamicCache` (with `kv_cache.GrowingLayer`s, which append in place),
left-padded: a row's real tokens are right-aligned, padding is masked, and position ids count real tokens
only, so a row computes what it would compute alone.
"""

from __future__ import annotations

import itertools
import time
from collections import abc, deque
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .bank import AdapterBank
from .batch_adapters import BatchAdapters, compact_order
from .errors import Unavailable
from .generation import RowRequest, left_pad
from .kv_cache import growing_cache, growing_from
from .sampling import make_generator, select_tokens

STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"


@dataclass(frozen=True)
class SchedulerLimits:
    """Bounds of the running batch.

    max_rows: sequences running or prefilling at once. max_kv_tokens: the sum of every admitted sequence's
    prompt + max_new_tokens. prefill_chunk: prompt positions (padded, per row) prefilled per step.
    queue_timeout_s: a sequence still waiting after this long fails UNAVAILABLE instead (0: never).
    """

    max_rows: int = 16
    max_kv_tokens: int = 16 * 2048
    prefill_chunk: int = 512
    queue_timeout_s: float = 0.0

    def problems(self) -> list[str]:
        problems = [
            f"{name} must be >= 1, got {getattr(self, name)}"
            for name in ("max_rows", "max_kv_tokens", "prefill_chunk")
            if getattr(self, name) < 1
        ]
        if self.queue_timeout_s < 0:
            problems.append(f"queue_timeout_s must be >= 0, got {self.queue_timeout_s}")
        return problems


@dataclass(eq=False)
class Sequence:
    """One request in the loop: its row, its generator, what it produced, and why it stopped."""

    row: RowRequest
    generator: torch.Generator | None
    arrival: int
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""
    error: Exception | None = None  # why it failed, when finish_reason is ERROR
    cancelled: bool = False  # set from any thread; acted on at the next step
    enqueued_at: float = 0.0  # time.monotonic() when it joined the waiting queue

    @property
    def reserved_tokens(self) -> int:
        return len(self.row.input_ids) + self.row.max_new_tokens

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)


@dataclass
class _Rows:
    """Rows sharing one left-padded KV cache.

    seqs: B sequences. cache: per layer keys / values [B, H, T, D]. mask: [B, T] (1 = real token).
    next_pos: [B, 1] position id of each row's next token. last: [B, 1] each row's token not yet fed.
    adapters: each row's bank slot and kept adapter weights (changed through the bank, beside the rows).
    """

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor
    next_pos: torch.Tensor
    last: torch.Tensor
    adapters: BatchAdapters

    def select(self, keep: abc.Sequence[int]) -> None:
        """Keep rows `keep` (indices, in order) and drop the columns only padding now uses."""
        if len(keep) < len(self.seqs):
            index = torch.tensor(list(keep), dtype=torch.long, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.seqs = [self.seqs[i] for i in keep]
            self.mask, self.next_pos, self.last = self.mask[index], self.next_pos[index], self.last[index]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else self.mask.shape[1]
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


@dataclass
class _PrefillGroup:
    """Sequences whose prompts are being prefilled together, left-padded to one length L.

    ids, mask, positions: [G, L]; done: positions prefilled so far; cache: after the first chunk.
    """

    seqs: list[Sequence]
    ids: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    adapters: BatchAdapters
    done: int = 0
    cache: DynamicCache | None = None


@dataclass
class StepResult:
    """What one step produced: (sequence, token) in order, and the sequences that finished."""

    tokens: list[tuple[Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)
    rows: int = 0  # rows in the decode forward (0: no decode this step)
    adapters: int = 0  # distinct bank slots among them
    prefill_rows: int = 0  # rows in this step's prefill chunk (0: none)
    joined: int = 0  # rows that joined a batch already running (mid-run admissions)


def merge_rows(a: _Rows, b: _Rows) -> _Rows:
    """`a` then `b` as one batch, the shorter cache left-padded with masked zeros. a: [B1, .., T1, ..],
    b: [B2, .., T2, ..] -> [B1 + B2, .., max(T1, T2), ..]. The result keeps `a.adapters`, which the caller
    extends with `b.adapters` through the bank."""
    length = max(a.mask.shape[1], b.mask.shape[1])

    def pad(tensor: torch.Tensor, dim: int) -> torch.Tensor:
        missing = length - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

    layers = [
        (
            torch.cat([pad(la.keys, 2), pad(lb.keys, 2)]),
            torch.cat([pad(la.values, 2), pad(lb.values, 2)]),
        )
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True)
    ]
    return _Rows(
        seqs=[*a.seqs, *b.seqs],
        cache=growing_from(layers),
        mask=torch.cat([pad(a.mask, 1), pad(b.mask, 1)]),
        next_pos=torch.cat([a.next_pos, b.next_pos]),
        last=torch.cat([a.last, b.last]),
        adapters=a.adapters,
    )


class Scheduler:
    """The step loop's state and policy. Not thread-safe: one thread calls `add`, `step`, `drain`;
    `Sequence.cancelled` may be set from anywhere."""

    def __init__(
        self,
        model: nn.Module,
        bank: AdapterBank,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        device: torch.device,
        limits: SchedulerLimits | None = None,
    ) -> None:
        self.model = model
        self._bank = bank
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.device = device
        self.limits = limits or SchedulerLimits()
        self._layers = model.config.num_hidden_layers
        self.waiting: deque[Sequence] = deque()
        self.prefilling: _PrefillGroup | None = None
        self.running: _Rows | None = None
        self._arrivals = itertools.count()

    # --- intake -----------------------------------------------------------------------------------------

    def sequence(self, row: RowRequest) -> Sequence:
        """A new sequence for `row`, with its own generator (seeded by the request or the row's fallback)."""
        return Sequence(row, make_generator(row.params, self.device, row.fallback_seed), next(self._arrivals))

    def fits_alone(self, row: RowRequest) -> bool:
        """Whether `row` could ever be admitted (its reservation alone is within the budget)."""
        return len(row.input_ids) + row.max_new_tokens <= self.limits.max_kv_tokens

    def add(self, seq: Sequence) -> None:
        """Queue `seq`. Its wait counts from `enqueued_at` when set earlier (a sequence that waited for its
        adapter to load), so queue_timeout_s bounds the whole wait."""
        if not seq.enqueued_at:
            seq.enqueued_at = time.monotonic()
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running)

    @property
    def active(self) -> list[Sequence]:
        """Sequences prefilling or running."""
        return [
            *(self.prefilling.seqs if self.prefilling else []),
            *(self.running.seqs if self.running else []),
        ]

    # --- one step ---------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> StepResult:
        result = StepResult()
        self._retire_cancelled(result)
        self._expire_waiting(result)
        if self.prefilling is None:
            self._admit()
        if self.prefilling is not None:
            self._prefill_chunk(result)
        if self.running is not None:
            self._decode(result)
        return result

    def drain(self, reason: str = CANCELLED) -> list[Sequence]:
        """Stop everything: every waiting, prefilling and running sequence finishes with `reason`."""
        seqs = [*self.waiting, *self.active]
        self.waiting.clear()
        self.prefilling = self.running = None
        for seq in seqs:
            seq.finish_reason = seq.finish_reason or reason
        return seqs

    def _retire_cancelled(self, result: StepResult) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self._finish(seq, CANCELLED, result)
        group = self.prefilling
        if group is not None and any(s.cancelled for s in group.seqs):
            keep = [i for i, s in enumerate(group.seqs) if not s.cancelled]
            for seq in group.seqs:
                if seq.cancelled:
                    self._finish(seq, CANCELLED, result)
            if not keep:
                self.prefilling = None
            else:
                index = torch.tensor(keep, dtype=torch.long, device=self.device)
                group.seqs = [group.seqs[i] for i in keep]
                group.ids, group.mask = group.ids[index], group.mask[index]
                group.positions = group.positions[index]
                if group.cache is not None:
                    group.cache.batch_select_indices(index)
                self._bank.select(group.adapters, keep)
        rows = self.running
        if rows is not None and any(s.cancelled for s in rows.seqs):
            for seq in rows.seqs:
                if seq.cancelled:
                    self._finish(seq, CANCELLED, result)
            self._retire(rows)
            if not rows.seqs:
                self.running = None

    def _expire_waiting(self, result: StepResult) -> None:
        timeout = self.limits.queue_timeout_s
        if not timeout:
            return
        now = time.monotonic()
        for seq in [s for s in self.waiting if now - s.enqueued_at > timeout]:
            self.waiting.remove(seq)
            seq.error = Unavailable(f"the request waited {timeout:g} s in the engine's queue; retry later")
            self._finish(seq, ERROR, result)

    def _admit(self) -> None:
        """Form a prefill group from the head of the waiting queue, within the limits."""
        active = self.active
        rows = len(active)
        reserved = sum(s.reserved_tokens for s in active)
        group: list[Sequence] = []
        while self.waiting:
            head = self.waiting[0]
            if rows + 1 > self.limits.max_rows or reserved + head.reserved_tokens > self.limits.max_kv_tokens:
                break
            group.append(self.waiting.popleft())
            rows += 1
            reserved += head.reserved_tokens
        if group:
            batch = left_pad([s.row.input_ids for s in group], self.pad_id, self.device)
            adapters = self._bank.batch([s.row.slot for s in group])
            self.prefilling = _PrefillGroup(
                group, batch.input_ids, batch.attention_mask, batch.position_ids, adapters
            )

    def _prefill_chunk(self, result: StepResult) -> None:
        group = self.prefilling
        assert group is not None
        start, length = group.done, group.ids.shape[1]
        end = min(length, start + self.limits.prefill_chunk)
        with self._bank.routing(group.adapters):
            out = self.model(
                input_ids=group.ids[:, start:end],
                attention_mask=group.mask[:, :end],
                position_ids=group.positions[:, start:end],
                past_key_values=group.cache or growing_cache(self._layers),
                use_cache=True,
                logits_to_keep=1,
            )
        group.cache, group.done = out.past_key_values, end
        result.prefill_rows = len(group.seqs)
        if end < length:
            return
        self.prefilling = None
        tokens = self._sample(out.logits[:, -1, :], group.seqs)
        joined = _Rows(
            seqs=group.seqs,
            cache=group.cache,
            mask=group.mask,
            next_pos=group.positions[:, -1:] + 1,
            last=torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None],
            adapters=group.adapters,
        )
        self._emit(joined.seqs, tokens, result)
        self._retire(joined)
        if not joined.seqs:
            return
        if self.running is None:
            self.running = joined
        else:
            result.joined = len(joined.seqs)
            self._bank.extend(self.running.adapters, joined.adapters)
            self.running = merge_rows(self.running, joined)

    def _decode(self, result: StepResult) -> None:
        rows = self.running
        assert rows is not None
        slots = rows.adapters.slots
        mask = torch.cat([rows.mask, rows.mask.new_ones(len(rows.seqs), 1)], dim=1)
        with self._bank.routing(rows.adapters):
            out = self.model(
                input_ids=rows.last,
                attention_mask=mask,
                position_ids=rows.next_pos,
                past_key_values=rows.cache,
                use_cache=True,
            )
        rows.cache, rows.mask, rows.next_pos = out.past_key_values, mask, rows.next_pos + 1
        tokens = self._sample(out.logits[:, -1, :], rows.seqs)
        rows.last = torch.tensor(tokens, dtype=torch.long, device=self.device)[:, None]
        result.rows, result.adapters = len(slots), len(set(slots))
        self._emit(rows.seqs, tokens, result)
        self._retire(rows)
        if not rows.seqs:
            self.running = None

    # --- helpers ----------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, seqs: abc.Sequence[Sequence]) -> list[int]:
        return select_tokens(logits, [s.row.params for s in seqs], [s.generator for s in seqs])

    def _emit(self, seqs: abc.Sequence[Sequence], tokens: abc.Sequence[int], result: StepResult) -> None:
        """Append each row's token, finish the rows that stopped."""
        for seq, token in zip(seqs, tokens, strict=True):
            seq.tokens.append(token)
            result.tokens.append((seq, token))
            if token in self.eos_ids:
                self._finish(seq, STOP, result)
            elif len(seq.tokens) >= seq.row.max_new_tokens:
                self._finish(seq, LENGTH, result)

    def _retire(self, rows: _Rows) -> None:
        """Drop `rows`' finished sequences (survivors in place, the tail's fill the holes)."""
        alive = [not s.finished for s in rows.seqs]
        if not any(alive):
            rows.seqs = []
            return
        order = compact_order(alive)
        rows.select(order)
        self._bank.select(rows.adapters, order)

    @staticmethod
    def _finish(seq: Sequence, reason: str, result: StepResult) -> None:
        seq.finish_reason = reason
        result.finished.append(seq)
