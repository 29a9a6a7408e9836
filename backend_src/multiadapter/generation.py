"""Batched generation over a mixed-adapter batch: left-padded prefill, then a decode step loop.

One forward pass per step serves every row; the bank's routing adds each row's adapter delta. Rows
that finish leave the batch: their KV cache rows are dropped, and rows from the tail fill the holes so the
routing's per-row adapter weights move as little as possible (batch_adapters.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .bank import BatchRouting
from .batch_adapters import compact_order
from .kv_cache import growing_cache
from .sampling import SamplingParams, make_generator, select_tokens


@dataclass(frozen=True)
class RowRequest:
    """One row: prompt token ids, its bank slot, how to sample, and the most tokens it may produce."""

    input_ids: Sequence[int]
    slot: int
    params: SamplingParams
    max_new_tokens: int
    fallback_seed: int = 0


@dataclass
class RowOutput:
    """Generated token ids (an EOS that stopped the row included) and why generation stopped."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""


@dataclass(frozen=True)
class Batch:
    """Left-padded prompts. input_ids, attention_mask, position_ids: [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> Batch:
    """Pad prompts on the left to one length; positions count real tokens only (pads get position 1,
    as Hugging Face's generate does, and are masked out)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, length - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[i, length - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return Batch(ids.to(device), mask.to(device), positions.to(device))


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits of every position of a left-padded batch: [B, T, V]. Routing must already be set."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return out.logits


def generate_rows(
    model: nn.Module,
    routing: BatchRouting,
    rows: Sequence[RowRequest],
    *,
    eos_ids: frozenset[int],
    pad_id: int,
    device: torch.device,
) -> list[RowOutput]:
    """Generate for every row in one batch. `routing` is the bank's routing for this batch.

    Each step runs one forward over the rows still active, selects each row's next token with its own
    sampling parameters and generator, and retires rows at EOS or at their token budget.
    """
    outputs = [RowOutput() for _ in rows]
    generators = [make_generator(r.params, device, r.fallback_seed) for r in rows]
    active = list(range(len(rows)))
    batch = left_pad([r.input_ids for r in rows], pad_id, device)
    routing.set_slots([r.slot for r in rows])
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        past_key_values=growing_cache(model.config.num_hidden_layers),
        use_cache=True,
        logits_to_keep=1,
    )
    cache = out.past_key_values
    mask = batch.attention_mask
    next_pos = batch.position_ids[:, -1:] + 1
    logits = out.logits[:, -1, :]
    while True:
        tokens = select_tokens(logits, [rows[i].params for i in active], [generators[i] for i in active])
        alive = []
        for i, token in zip(active, tokens, strict=True):
            outputs[i].token_ids.append(token)
            if token in eos_ids:
                outputs[i].finish_reason = "stop"
            elif len(outputs[i].token_ids) >= rows[i].max_new_tokens:
                outputs[i].finish_reason = "length"
            alive.append(not outputs[i].finish_reason)
        if not any(alive):
            return outputs
        step_tokens = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        if not all(alive):
            keep = compact_order(alive)
            index = torch.tensor(keep, dtype=torch.long, device=device)
            cache.batch_select_indices(index)
            mask, next_pos, step_tokens = mask[index], next_pos[index], step_tokens[index]
            active = [active[j] for j in keep]
            routing.select(keep)
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)
        out = model(
            input_ids=step_tokens,
            attention_mask=mask,
            position_ids=next_pos,
            past_key_values=cache,
            use_cache=True,
        )
        cache = out.past_key_values
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :]
