"""AdapterHub bottleneck `adapter_config.json`, parsed once into a frozen, validated spec.

The file AdapterHub's `save_adapter` writes holds metadata (`model_type`, `hidden_size`, `name`, ...) and,
under `config`, either a preset name or the full `BnConfig` as a dict. A dict starts from `BnConfig`'s
defaults; a preset (`seq_bn` Pfeiffer, `double_seq_bn` Houlsby, `par_bn` parallel) only overrides them.
Every field is classified: used by the math, irrelevant at inference (training settings), or
unsupported (refused by name unless it holds its neutral value).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .bottleneck import ATTENTION, FFN, BottleneckForm, is_known_activation
from .errors import AdapterLoadError

# BnConfig's own defaults; mh_adapter, output_adapter, reduction_factor, non_linearity have none.
_BN_DEFAULTS: dict[str, Any] = {
    "original_ln_before": False,
    "original_ln_after": True,
    "ln_before": False,
    "ln_after": False,
    "is_parallel": False,
    "scaling": 1.0,
    "residual_before_ln": True,
    "adapter_residual_before_ln": False,
    "leave_out": [],
}
_REQUIRED = ("mh_adapter", "output_adapter", "reduction_factor", "non_linearity")
_BOOLEANS = (
    "original_ln_before",
    "original_ln_after",
    "is_parallel",
    "adapter_residual_before_ln",
    "ln_after",
)
_SEQ_BN = {
    "original_ln_before": True,
    "mh_adapter": False,
    "output_adapter": True,
    "non_linearity": "relu",
    "reduction_factor": 16,
}
_DOUBLE_SEQ_BN = {
    "mh_adapter": True,
    "output_adapter": True,
    "non_linearity": "swish",
    "reduction_factor": 16,
}
_PAR_BN = {
    "mh_adapter": False,
    "output_adapter": True,
    "non_linearity": "relu",
    "reduction_factor": 2,
    "is_parallel": True,
    "scaling": 4.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "seq_bn": _SEQ_BN,
    "pfeiffer": _SEQ_BN,
    "double_seq_bn": _DOUBLE_SEQ_BN,
    "houlsby": _DOUBLE_SEQ_BN,
    "par_bn": _PAR_BN,
    "parallel": _PAR_BN,
    "scaled_par_bn": {**_PAR_BN, "scaling": "learned"},
    "scaled_parallel": {**_PAR_BN, "scaling": "learned"},
}
_USED = frozenset({*_BN_DEFAULTS, *_REQUIRED})
# Training-time settings: initialisation, dropout, stochastic depth (identity in eval mode), and the
# hypercomplex (PHM) parameters, which only matter when phm_layer (refused) is on.
_IRRELEVANT_AT_INFERENCE = frozenset(
    {
        "init_weights",
        "init_weights_seed",
        "dropout",
        "stochastic_depth",
        "phm_dim",
        "factorized_phm_W",
        "shared_W_phm",
        "shared_phm_rule",
        "factorized_phm_rule",
        "phm_c_init",
        "phm_init_range",
        "learn_phm",
        "hypercomplex_nonlinearity",
        "phm_rank",
        "phm_bias",
    }
)
_UNSUPPORTED = {
    "architecture": "only bottleneck adapters are served from AdapterHub (use PEFT for LoRA)",
    "phm_layer": "PHM (Compacter) layers are not supported",
    "use_gating": "gating (UniPELT) averages over the whole sequence, which a KV cache cannot serve",
    "inv_adapter": "invertible adapters are not supported",
    "inv_adapter_reduction_factor": "invertible adapters are not supported",
    "cross_adapter": "cross-attention adapters are not supported (decoder-only bases)",
    "ln_before": "a new layer norm before the bottleneck is not supported",
}
_NEUTRAL = {"architecture": None, "inv_adapter": None, "inv_adapter_reduction_factor": None}
_METADATA = frozenset({"config", "hidden_size", "model_class", "model_name", "model_type", "name", "version"})
_KNOWN_PRESETS_REFUSED = (
    "compacter",
    "compacter++",
    "seq_bn_inv",
    "double_seq_bn_inv",
    "pfeiffer+inv",
    "houlsby+inv",
)


def is_adapterhub_config(raw: Any) -> bool:
    """Whether a parsed adapter_config.json is AdapterHub's (metadata + `config`) rather than PEFT's."""
    return isinstance(raw, Mapping) and "config" in raw and "peft_type" not in raw


@dataclass(frozen=True)
class BottleneckSpec:
    """What a bottleneck adapter adds where. Built by `from_dict`, which lists every problem at once."""

    adapter_id: str
    name: str
    model_type: str
    hidden_size: int
    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | Mapping[str, float]
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool = True
    adapter_residual_before_ln: bool = False
    ln_after: bool = False
    is_parallel: bool = False
    scaling: float | str = 1.0
    leave_out: tuple[int, ...] = ()

    @classmethod
    def from_dict(cls, adapter_id: str, raw: Mapping[str, Any]) -> BottleneckSpec:
        """Parse AdapterHub's whole adapter_config.json (metadata and `config`)."""
        if not isinstance(raw, Mapping):
            raise AdapterLoadError(adapter_id, "adapter_config.json must hold a JSON object")
        problems: list[str] = []
        for key, value in raw.items():
            if key not in _METADATA and value is not None:
                problems.append(f"{key}: unknown top-level setting with a value {value!r}")
        name, model_type, hidden = raw.get("name"), raw.get("model_type"), raw.get("hidden_size")
        if not isinstance(name, str) or not name:
            problems.append(f"name: expected the adapter's name (its weight keys use it), got {name!r}")
        if not isinstance(model_type, str) or not model_type:
            problems.append(f"model_type: expected the base model type, got {model_type!r}")
        if not _is_positive_int(hidden):
            problems.append(f"hidden_size: expected a positive integer, got {hidden!r}")

        fields = _resolve_fields(raw.get("config"), problems)
        if fields:
            _check_fields(fields, problems)
        if problems:
            raise AdapterLoadError(adapter_id, problems)
        rf, scaling = fields["reduction_factor"], fields["scaling"]
        return cls(
            adapter_id=adapter_id,
            name=name,
            model_type=model_type,
            hidden_size=int(hidden),
            mh_adapter=fields["mh_adapter"],
            output_adapter=fields["output_adapter"],
            reduction_factor=dict(rf) if isinstance(rf, Mapping) else float(rf),
            non_linearity=fields["non_linearity"],
            residual_before_ln=fields["residual_before_ln"],
            scaling=scaling if isinstance(scaling, str) else float(scaling),
            leave_out=tuple(fields["leave_out"]),
            **{key: fields[key] for key in _BOOLEANS},
        )

    @property
    def form(self) -> BottleneckForm:
        return BottleneckForm(
            parallel=self.is_parallel,
            original_ln_before=self.original_ln_before,
            original_ln_after=self.original_ln_after,
            residual_before_ln=self.residual_before_ln,
            adapter_residual_before_ln=self.adapter_residual_before_ln,
            ln_after=self.ln_after,
            activation=self.non_linearity,
        )

    def positions(self, layer: int) -> tuple[str, ...]:
        """Positions adapted in decoder layer `layer` (AdapterHub's `match`: leave_out, then the flags)."""
        if layer in self.leave_out:
            return ()
        return tuple(p for p, on in ((ATTENTION, self.mh_adapter), (FFN, self.output_adapter)) if on)

    def bottleneck_size(self, layer: int, hidden_size: int) -> int | None:
        """Bottleneck width in layer `layer`, as AdapterHub computes it; None when the per-layer
        reduction_factor has neither this layer nor a default."""
        rf = self.reduction_factor
        if isinstance(rf, Mapping):
            rf = rf.get(str(layer), rf.get("default"))
            if rf is None:
                return None
        return max(1, int(hidden_size // rf))


def _resolve_fields(config: Any, problems: list[str]) -> dict[str, Any]:
    if isinstance(config, str):
        if config in PRESETS:
            return {**_BN_DEFAULTS, **PRESETS[config]}
        if config in _KNOWN_PRESETS_REFUSED:
            problems.append(f"config: preset {config!r} is not supported (PHM or invertible adapters)")
        else:
            problems.append(f"config: unknown preset {config!r} (known: {', '.join(sorted(PRESETS))})")
        return {}
    if not isinstance(config, Mapping):
        problems.append(f"config: expected a preset name or an object, got {config!r}")
        return {}
    missing = [key for key in _REQUIRED if key not in config]
    if missing:
        problems.append(f"config: required field(s) missing: {', '.join(missing)}")
    return {**_BN_DEFAULTS, **config}


def _check_fields(fields: Mapping[str, Any], problems: list[str]) -> None:
    for key, value in fields.items():
        if key in _UNSUPPORTED:
            if value != _NEUTRAL.get(key, False):
                problems.append(f"{key}: {_UNSUPPORTED[key]} (got {value!r})")
        elif (
            key not in _USED and key not in _IRRELEVANT_AT_INFERENCE and value not in (None, False, 0, [], {})
        ):
            problems.append(f"{key}: unknown setting with a non-default value {value!r}")
    for key in (*_BOOLEANS, "mh_adapter", "output_adapter"):
        if key in fields and not isinstance(fields[key], bool):
            problems.append(f"{key}: expected true or false, got {fields[key]!r}")
    rbl = fields.get("residual_before_ln")
    if rbl == "post_add":
        problems.append("residual_before_ln: 'post_add' needs the base's layer norm inside the adapter block")
    elif not isinstance(rbl, bool):
        problems.append(f"residual_before_ln: expected true or false, got {rbl!r}")
    if fields.get("mh_adapter") is False and fields.get("output_adapter") is False:
        problems.append("mh_adapter and output_adapter are both false: the adapter adds nothing")
    nl = fields.get("non_linearity", "relu")  # a missing required field is reported once, above
    if not isinstance(nl, str) or not is_known_activation(nl):
        problems.append(f"non_linearity: unknown activation {nl!r}")
    scaling = fields.get("scaling")
    if scaling not in ("learned", "channel") and not _is_finite_number(scaling):
        problems.append(f"scaling: expected a number, 'learned' or 'channel', got {scaling!r}")
    rf = fields.get("reduction_factor", 1)
    if isinstance(rf, Mapping):
        for key, value in rf.items():
            if not (key == "default" or (isinstance(key, str) and key.isdigit())):
                problems.append(f"reduction_factor[{key!r}]: keys are layer numbers or 'default'")
            if not (_is_finite_number(value) and value > 0):
                problems.append(f"reduction_factor[{key!r}]: expected a positive number, got {value!r}")
    elif not (_is_finite_number(rf) and rf > 0):
        problems.append(f"reduction_factor: expected a positive number or a per-layer object, got {rf!r}")
    leave_out = fields.get("leave_out")
    if not (isinstance(leave_out, list) and all(_is_int(i) and i >= 0 for i in leave_out)):
        problems.append(f"leave_out: expected a list of layer numbers, got {leave_out!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_int(value) and value > 0


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
