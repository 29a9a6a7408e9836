"""What the demo trains: the base's shape and schedule, and one spec per adapter (PEFT LoRA or AdapterHub
bottleneck).

Sized so that ``python -m training.demo`` finishes in a few minutes on two CPU cores while the base and
every adapter stay above the accuracy bar on held-out prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from adapters import AdapterConfig
from peft import LoraConfig

from training.model import BaseShape
from training.prompts import CASED, PLAIN, REPETITIVE, PromptStyle
from training.train import Recipe

ACCURACY_BAR = 0.99  # exact greedy answers on EVAL_PROMPTS held-out prompts, in every scored dtype
EVAL_PROMPTS = 1000
# float32 is how the model was trained; bfloat16 is what the server runs on a GPU.
SCORED_DTYPES = (torch.float32, torch.bfloat16)

BASE_TASK = "echo"
BASE_SHAPE = BaseShape(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)
BASE_RECIPE = Recipe(steps=2500, batch_size=64, lr=3e-3, warmup_steps=100, weight_decay=0.01)
# Capitals so that `upper` finds trained embeddings for what it writes (LoRA on the projections cannot
# teach the base new tokens); repetitive prompts because runs and periodic patterns are where a base
# trained on uniform prompts alone miscounts.
BASE_STYLES: tuple[PromptStyle, ...] = (PLAIN, CASED, REPETITIVE)
ADAPTER_STYLES: tuple[PromptStyle, ...] = (PLAIN, REPETITIVE)

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSpec:
    """A PEFT LoRA adapter: its id (what requests name), the task it learns, its shape and schedule."""

    adapter_id: str
    task: str
    rank: int
    target_modules: tuple[str, ...]
    recipe: Recipe

    @property
    def label(self) -> str:
        return f"{self.adapter_id} (LoRA r={self.rank})"

    @property
    def kind(self) -> str:
        return "lora"

    def lora_config(self) -> LoraConfig:
        return LoraConfig(
            task_type="CAUSAL_LM",
            r=self.rank,
            lora_alpha=2 * self.rank,
            lora_dropout=0.0,
            target_modules=list(self.target_modules),
        )


@dataclass(frozen=True)
class BottleneckSpec:
    """An AdapterHub bottleneck adapter: id, task, preset (`seq_bn`, `double_seq_bn`, `par_bn`), the
    bottleneck width as hidden_size / reduction_factor, and its schedule."""

    adapter_id: str
    task: str
    preset: str
    reduction_factor: int
    recipe: Recipe

    @property
    def label(self) -> str:
        return f"{self.adapter_id} ({self.preset}, reduction {self.reduction_factor})"

    @property
    def kind(self) -> str:
        return self.preset

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig.load(self.preset, reduction_factor=self.reduction_factor)


AdapterSpec = LoraSpec | BottleneckSpec

# Batches of 32 reach the bar with about half the compute that batches of 64 need. upper and rot13
# substitute characters along the base's own copying; reverse needs new attention patterns, so it gets
# the most steps. Bottleneck adapters only rewrite the residual stream after a sub-block, so their tasks
# keep the prompt's alignment (a deletion task such as removing vowels stalled near 65% in trials).
ADAPTERS: tuple[AdapterSpec, ...] = (
    LoraSpec("upper", "upper", 8, ATTENTION + MLP, Recipe(steps=1200, batch_size=32, lr=3e-3)),
    LoraSpec("reverse", "reverse", 16, ATTENTION + MLP, Recipe(steps=4000, batch_size=32, lr=3e-3)),
    LoraSpec("rot13", "rot13", 16, ("v_proj", "o_proj", *MLP), Recipe(steps=1600, batch_size=32, lr=3e-3)),
    BottleneckSpec("title", "title", "seq_bn", 1, Recipe(steps=10000, batch_size=32, lr=3e-3)),
    BottleneckSpec("shift", "shift", "double_seq_bn", 2, Recipe(steps=6000, batch_size=32, lr=3e-3)),
    BottleneckSpec("upper_vowels", "upper_vowels", "par_bn", 2, Recipe(steps=3500, batch_size=32, lr=3e-3)),
)
