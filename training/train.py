"""One training loop for the base (all weights) and for LoRA adapters (only the trainable ones)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tqdm import tqdm

from training.data import Batch


@dataclass(frozen=True)
class Recipe:
    """Optimiser and schedule: AdamW, linear warm-up, then cosine decay to ``final_lr_ratio * lr``."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 50
    weight_decay: float = 0.0
    final_lr_ratio: float = 0.05
    max_grad_norm: float = 1.0

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_lr_ratio + (1.0 - self.final_lr_ratio) * cosine


def train(model: torch.nn.Module, batches: Iterator[Batch], recipe: Recipe, label: str) -> float:
    """Train ``model``'s trainable parameters for ``recipe.steps`` batches; returns the final smoothed loss.

    A tqdm bar on stderr shows progress and the smoothed loss.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, recipe.lr_factor)
    model.train()
    smoothed = math.nan
    with tqdm(total=recipe.steps, desc=label, unit="step", dynamic_ncols=True) as bar:
        for _ in range(recipe.steps):
            batch = next(batches)
            loss = model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            smoothed = loss.item() if math.isnan(smoothed) else 0.95 * smoothed + 0.05 * loss.item()
            bar.set_postfix(loss=f"{smoothed:.4f}", refresh=False)
            bar.update()
    model.eval()
    return smoothed
