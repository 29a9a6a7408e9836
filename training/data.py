"""Prompts and training batches.

Prompts are lowercase ASCII letters and spaces (ALPHABET), MIN_LEN to MAX_LEN characters, uniform in length
then in characters; the base also trains on prompts with capitals (CASED_ALPHABET). A fixed hash splits
every possible prompt into train and held-out, so held-out prompts are never trained on, whatever the
seed, and any seeded sample of them is a fair test set.

A training example is the tokenizer's framing of the prompt followed by the answer and ``<eos>``::

    <bos> p r o m p t <sep> a n s w e r <eos>
    ------ no loss ------- ---- loss ---------
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

ALPHABET = string.ascii_lowercase + " "
CASED_ALPHABET = string.ascii_letters + " "
MIN_LEN = 1
MAX_LEN = 24
HELD_OUT_ONE_IN = 8  # share of all prompts reserved for evaluation
EVAL_SEED = 2024  # fixed, so every training seed is scored on the same held-out prompts
IGNORE_INDEX = -100  # label of positions that carry no loss (transformers' convention)


def is_held_out(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the held-out split (stable across runs and machines)."""
    return zlib.crc32(prompt.encode()) % HELD_OUT_ONE_IN == 0


@dataclass(frozen=True)
class PromptStyle:
    """How a share of the training prompts is drawn: characters uniform over ``alphabet``, or over a
    random few of them (``distinct`` = (fewest, most)) per prompt."""

    alphabet: str = ALPHABET
    distinct: tuple[int, int] | None = None


PLAIN = PromptStyle()
CASED = PromptStyle(CASED_ALPHABET)
# Runs and periodic patterns ("aaab", "abab") are rare among uniform prompts, yet they are where
# copying by content is ambiguous and the model must count positions: drawn on purpose here.
REPETITIVE = PromptStyle(ALPHABET, distinct=(2, 4))


def sample_prompts(
    rng: np.random.Generator, n: int, *, held_out: bool, style: PromptStyle = PLAIN
) -> list[str]:
    """``n`` random prompts from one split (repeats possible): length uniform, then characters."""
    prompts: list[str] = []
    while len(prompts) < n:
        # Rejection sampling; the held-out split keeps about one candidate in HELD_OUT_ONE_IN, so
        # draw enough for one pass in most cases.
        draw = (n - len(prompts)) * (HELD_OUT_ONE_IN if held_out else 2)
        lengths = rng.integers(MIN_LEN, MAX_LEN + 1, size=draw)
        chars = rng.integers(0, len(style.alphabet), size=(draw, MAX_LEN))
        if style.distinct is not None:
            few = rng.integers(style.distinct[0], style.distinct[1] + 1, size=(draw, 1))
            letters = rng.permuted(np.tile(np.arange(len(style.alphabet)), (draw, 1)), axis=1)
            chars = np.take_along_axis(letters, chars % few, axis=1)
        for length, row in zip(lengths, chars, strict=True):
            prompt = "".join(style.alphabet[c] for c in row[:length])
            if is_held_out(prompt) == held_out:
                prompts.append(prompt)
    return prompts[:n]


def held_out_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct held-out prompts.

    Short lengths have few held-out prompts (about 27 / HELD_OUT_ONE_IN of length 1), so they are a
    little rarer here than in the uniform length distribution.
    """
    prompts: dict[str, None] = {}
    while len(prompts) < n:
        prompts.update(dict.fromkeys(sample_prompts(rng, n - len(prompts), held_out=True)))
    return list(prompts)[:n]


def evaluation_prompts(n: int) -> list[str]:
    """The held-out prompts the accuracy table is measured on (the same for every training seed)."""
    return held_out_prompts(np.random.default_rng(EVAL_SEED), n)


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
