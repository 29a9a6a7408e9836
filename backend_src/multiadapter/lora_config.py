"""PEFT LoRA `adapter_config.json`, parsed once into a frozen, validated spec.

Every field PEFT writes is classified: used by the math, irrelevant at inference (training-time
settings and metadata), or unsupported (refused unless it holds its neutral default). A field this
module has never heard of is accepted only while it holds a neutral value, so a newer PEFT that adds
an inactive option still loads, and one that turns a new feature on is refused by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import AdapterLoadError

# Settings of training or of adapter creation; they do not change inference.
_IRRELEVANT_AT_INFERENCE = frozenset(
    {
        "task_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "lora_dropout",
        "init_lora_weights",
        "megatron_core",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "qalora_group_size",
        "ensure_weight_tying",
        "fan_in_fan_out",
    }
)
_USED = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "target_modules",
        "exclude_modules",
        "use_rslora",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "bias",
    }
)
# Features we do not serve, with why; refused unless neutral.
_UNSUPPORTED = {
    "use_dora": "DoRA is not supported",
    "modules_to_save": "modules_to_save (fully trained copies of base modules) is not supported",
    "trainable_token_indices": "trainable token embeddings are not supported",
    "megatron_config": "Megatron-parallel LoRA layers are not supported",
    "use_qalora": "QA-LoRA is not supported",
    "layer_replication": "layer replication is not supported",
    "lora_bias": "a LoRA bias term is not supported",
    "target_parameters": "LoRA on bare parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not supported",
    "velora_config": "VeLoRA is not supported",
    "monteclora_config": "MonteCLoRA is not supported",
    "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "Arrow routing is not supported",
    "kasa_config": "KaSA is not supported",
}

ALL_LINEAR = "all-linear"


def _is_neutral(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == "" or value == "none"


@dataclass(frozen=True)
class LoraModuleParams:
    """Rank, alpha and the folded scale of one adapted module."""

    rank: int
    alpha: float
    scale: float


@dataclass(frozen=True)
class LoraSpec:
    """What an adapter adapts and how. Built by `from_dict`, which lists every problem at once."""

    adapter_id: str
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    exclude_modules: tuple[str, ...] | str | None = None
    use_rslora: bool = False
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, adapter_id: str, raw: Mapping[str, Any]) -> LoraSpec:
        problems: list[str] = []
        if not isinstance(raw, Mapping):
            raise AdapterLoadError(adapter_id, "adapter_config.json must hold a JSON object")
        peft_type = raw.get("peft_type")
        if peft_type != "LORA":
            problems.append(f"peft_type: expected 'LORA', got {peft_type!r}")
        for key, value in raw.items():
            if key in _UNSUPPORTED:
                if not _is_neutral(value):
                    problems.append(f"{key}: {_UNSUPPORTED[key]} (got {value!r})")
            elif key not in _USED and key not in _IRRELEVANT_AT_INFERENCE and not _is_neutral(value):
                problems.append(f"{key}: unknown setting with a non-default value {value!r}")
        if raw.get("bias", "none") != "none":
            problems.append(f"bias: only 'none' is supported (got {raw.get('bias')!r})")

        r = raw.get("r")
        if not _is_positive_int(r):
            problems.append(f"r: expected a positive integer, got {r!r}")
        alpha = raw.get("lora_alpha", r)
        if not _is_finite_number(alpha):
            problems.append(f"lora_alpha: expected a finite number, got {alpha!r}")

        targets = raw.get("target_modules")
        if isinstance(targets, str):
            if targets != ALL_LINEAR:
                try:
                    re.compile(targets)
                except re.error as exc:
                    problems.append(f"target_modules: invalid regular expression ({exc})")
            target_value: tuple[str, ...] | str = targets
        elif isinstance(targets, list | tuple) and targets and all(isinstance(t, str) for t in targets):
            target_value = tuple(targets)
        else:
            problems.append(f"target_modules: expected a non-empty list of names or a regex, got {targets!r}")
            target_value = ()

        exclude = raw.get("exclude_modules")
        exclude_value: tuple[str, ...] | str | None
        if exclude is None or isinstance(exclude, str):
            exclude_value = exclude or None
        elif isinstance(exclude, list | tuple) and all(isinstance(t, str) for t in exclude):
            exclude_value = tuple(exclude) or None
        else:
            problems.append(f"exclude_modules: expected a list of names or a regex, got {exclude!r}")
            exclude_value = None

        use_rslora = raw.get("use_rslora", False)
        if not isinstance(use_rslora, bool):
            problems.append(f"use_rslora: expected true or false, got {use_rslora!r}")

        rank_pattern = raw.get("rank_pattern") or {}
        alpha_pattern = raw.get("alpha_pattern") or {}
        for name, pattern, check in (
            ("rank_pattern", rank_pattern, _is_positive_int),
            ("alpha_pattern", alpha_pattern, _is_finite_number),
        ):
            if not isinstance(pattern, Mapping):
                problems.append(f"{name}: expected an object, got {pattern!r}")
                continue
            for key, value in pattern.items():
                if not check(value):
                    problems.append(f"{name}[{key!r}]: invalid value {value!r}")
                try:
                    re.compile(key)
                except re.error as exc:
                    problems.append(f"{name}[{key!r}]: invalid regular expression ({exc})")

        layers = raw.get("layers_to_transform")
        layers_value: tuple[int, ...] | None = None
        if isinstance(layers, bool):
            problems.append(f"layers_to_transform: expected an integer or a list, got {layers!r}")
        elif isinstance(layers, int):
            layers_value = (layers,)
        elif isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
            layers_value = tuple(layers) or None
        elif layers is not None:
            problems.append(f"layers_to_transform: expected an integer or a list, got {layers!r}")
        lp = raw.get("layers_pattern")
        lp_value: tuple[str, ...] | None = None
        if isinstance(lp, str):
            lp_value = (lp,) if lp else None
        elif isinstance(lp, list) and all(isinstance(p, str) for p in lp):
            lp_value = tuple(lp) or None
        elif lp is not None:
            problems.append(f"layers_pattern: expected a string or a list, got {lp!r}")

        if problems:
            raise AdapterLoadError(adapter_id, problems)
        return cls(
            adapter_id=adapter_id,
            r=int(r),
            lora_alpha=float(alpha),
            target_modules=target_value,
            exclude_modules=exclude_value,
            use_rslora=use_rslora,
            rank_pattern=dict(rank_pattern),
            alpha_pattern={k: float(v) for k, v in alpha_pattern.items()},
            layers_to_transform=layers_value,
            layers_pattern=lp_value,
        )

    def targets(self, name: str, *, is_output_layer: bool = False, is_linear: bool = True) -> bool:
        """Whether module `name` (as in `model.named_modules()`) is adapted. Follows PEFT's rules;
        `all-linear` means every Linear / Conv1D layer except the output layer."""
        if self.exclude_modules is not None:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, name):
                    return False
            elif name in self.exclude_modules or any(name.endswith("." + e) for e in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            if self.target_modules == ALL_LINEAR:
                return is_linear and not is_output_layer
            return re.fullmatch(self.target_modules, name) is not None
        if name in self.target_modules:
            return True
        if not any(name.endswith("." + t) for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        return _layer_index(name, self.layers_pattern) in self.layers_to_transform

    def module_params(self, name: str) -> LoraModuleParams:
        """Rank, alpha and scale for module `name`, after rank_pattern / alpha_pattern."""
        rank_key = _pattern_key(self.rank_pattern, name)
        rank = int(self.rank_pattern[rank_key]) if rank_key is not None else self.r
        alpha_key = _pattern_key(self.alpha_pattern, name)
        alpha = float(self.alpha_pattern[alpha_key]) if alpha_key is not None else self.lora_alpha
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return LoraModuleParams(rank=rank, alpha=alpha, scale=scale)


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str | None:
    # PEFT's get_pattern_key: the first pattern that matches a dotted suffix of the module name.
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _layer_index(name: str, layers_pattern: tuple[str, ...] | None) -> int | None:
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
