"""Per-request sampling parameters, validated once, and per-row token selection."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import InvalidRequest


@dataclass(frozen=True)
class SamplingLimits:
    """Server-side bounds for request parameters."""

    default_max_tokens: int = 64
    max_tokens_cap: int = 512


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable filtering."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    @classmethod
    def from_request(
        cls,
        limits: SamplingLimits,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> SamplingParams:
        """Validate optional request values; raises InvalidRequest naming every bad field."""
        problems = []
        if max_tokens is None:
            max_tokens = limits.default_max_tokens
        elif not 1 <= max_tokens <= limits.max_tokens_cap:
            problems.append(f"max_tokens must be between 1 and {limits.max_tokens_cap}, got {max_tokens}")
        if temperature is None:
            temperature = 0.0
        elif not (math.isfinite(temperature) and temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {temperature}")
        if top_p is None:
            top_p = 1.0
        elif not (math.isfinite(top_p) and 0 < top_p <= 1):
            problems.append(f"top_p must be in (0, 1], got {top_p}")
        if top_k is None:
            top_k = 0
        elif top_k < 0:
            problems.append(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if problems:
            raise InvalidRequest("; ".join(problems))
        return cls(int(max_tokens), float(temperature), float(top_p), int(top_k), seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(
    params: SamplingParams, device: torch.device, fallback_seed: int
) -> torch.Generator | None:
    """A private generator for a sampled row: seeded by the request, else by the server's own stream."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((params.seed if params.seed is not None else fallback_seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def select_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token of each row. logits: [n, V] (any float dtype); params, generators: length n.

    Semantics: token[i] = argmax(logits[i]) if greedy else sample(softmax(filter(logits[i] / t[i]))).
    """
    greedy_ids = logits.argmax(dim=-1).tolist()
    tokens = []
    for i, p in enumerate(params):
        if p.greedy:
            tokens.append(int(greedy_ids[i]))
            continue
        row = logits[i].float() / p.temperature
        if p.top_k and p.top_k < row.shape[-1]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(row, descending=True)
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token once the mass before it already reaches top_p; the first token always stays.
            drop = probs.cumsum(-1) - probs >= p.top_p
            row = row.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(row, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generators[i]).item()))
    return tokens
