"""Exact-match accuracy of greedy decoding on left-padded batches, scored against a task oracle."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from training.prompts import MAX_LEN


@dataclass(frozen=True)
class Score:
    """Exact matches out of ``total`` prompts, and every miss."""

    correct: int
    total: int
    misses: tuple[tuple[str, str, str], ...]  # (prompt, expected, got)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


@torch.no_grad()
def greedy_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    batch_size: int = 250,
) -> list[str]:
    """Each prompt's greedy answer: ``tokenizer(prompt)``, generate until <eos>, decode the new tokens.

    Prompts are batched by length (left padding) and answers returned in the order of ``prompts``.
    """
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        inputs = tokenizer([prompts[i] for i in rows], return_tensors="pt", padding=True)
        output = model.generate(
            **inputs,
            max_new_tokens=MAX_LEN + 1,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new_ids = output[:, inputs["input_ids"].shape[1] :]
        for i, ids in zip(rows, new_ids.tolist(), strict=True):
            answers[i] = tokenizer.decode(ids, skip_special_tokens=True)
    return [answers[i] for i in range(len(prompts))]


def exact_match(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str],
    oracle: Callable[[str], str],
) -> Score:
    """How many greedy answers equal ``oracle(prompt)`` exactly."""
    got = greedy_answers(model, tokenizer, prompts)
    misses = [(p, oracle(p), g) for p, g in zip(prompts, got, strict=True) if g != oracle(p)]
    return Score(len(prompts) - len(misses), len(prompts), tuple(misses))
