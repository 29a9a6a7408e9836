"""Training batches over the demo's prompts (training/prompts.py: alphabet, lengths, the held-out split).

A training example is the tokenizer's framing of the prompt followed by the answer and ``<eos>``::

    <bos> p r o m p t <sep> a n s w e r <eos>
    ------ no loss ------- ---- loss ---------
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from training.prompts import PLAIN, PromptStyle, sample_prompts

IGNORE_INDEX = -100  # label of positions that carry no loss (transformers' convention)


@dataclass(frozen=True)
class Batch:
    """Right-padded training examples; every tensor is [B, T]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX except on the answer tokens and <eos>


def encode_batch(tokenizer: PreTrainedTokenizerFast, prompts: list[str], answers: list[str]) -> Batch:
    """Frame each prompt with the tokenizer's template, append the answer and <eos>, and pad."""
    prompt_ids = tokenizer(prompts)["input_ids"]
    answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) + 1 for p, a in zip(prompt_ids, answer_ids, strict=True))
    input_ids = torch.full((len(prompts), length), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), length), IGNORE_INDEX)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, (p, a) in enumerate(zip(prompt_ids, answer_ids, strict=True)):
        example = p + a + [tokenizer.eos_token_id]
        input_ids[row, : len(example)] = torch.tensor(example)
        attention_mask[row, : len(example)] = 1
        labels[row, len(p) : len(example)] = torch.tensor(example[len(p) :])
    return Batch(input_ids, attention_mask, labels)


def training_batches(
    rng: np.random.Generator,
    tokenizer: PreTrainedTokenizerFast,
    transform: Callable[[str], str],
    batch_size: int,
    *,
    styles: Sequence[PromptStyle] = (PLAIN,),
    pool_batches: int = 16,
) -> Iterator[Batch]:
    """Endless batches of training-split prompts and their answers under ``transform``.

    Each style supplies an equal share of the prompts. Prompts are drawn ``pool_batches`` batches
    at a time and grouped by length, so each batch holds prompts of similar length and little of it is
    padding; the groups are yielded in random order.
    """
    shares = np.array_split(np.arange(batch_size * pool_batches), len(styles))
    while True:
        pool = [
            prompt
            for style, share in zip(styles, shares, strict=True)
            for prompt in sample_prompts(rng, len(share), held_out=False, style=style)
        ]
        pool.sort(key=len)
        for start in rng.permutation(pool_batches) * batch_size:
            prompts = pool[start : start + batch_size]
            yield encode_batch(tokenizer, prompts, [transform(p) for p in prompts])
