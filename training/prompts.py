"""The demo's prompts: lowercase ASCII letters and spaces (ALPHABET), MIN_LEN to MAX_LEN characters, uniform
in length then in characters. A fixed hash splits every possible prompt into train and held-out, so held-out
prompts are never trained on, whatever the seed, and any seeded sample of them is a fair test set.

NumPy only (no torch), so the load test can draw the same held-out prompts the accuracy table was scored on.
"""

from __future__ import annotations

import string
import zlib
from dataclasses import dataclass

import numpy as np

ALPHABET = string.ascii_lowercase + " "
CASED_ALPHABET = string.ascii_letters + " "
MIN_LEN = 1
MAX_LEN = 24
HELD_OUT_ONE_IN = 8  # share of all prompts reserved for evaluation
EVAL_SEED = 2024  # fixed, so every training seed is scored on the same held-out prompts


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
