"""Folding a LoRA adapter into the base weights, for merged-weight variants of the base model.

A LoRA adapter adds a low-rank term to a linear layer: y = W x + s B (A x), with A [r, in], B [out, r]
and the scale s = alpha / r (rsLoRA: alpha / sqrt(r)). The loader already folds s into B
(`LoraModuleWeights.b_scaled`), so the layer equals one with the weight

    W' = W + B_scaled @ A                 (W, W' [out, in]; B_scaled @ A has rank <= r)

which is exact up to rounding: the merged model needs no adapter at all. The product is formed in float32
from float32 copies of W, A and B_scaled, then cast once to the target dtype.

GPT-2's `Conv1D` stores its weight transposed, [in, out] (y = x W + b), so there the update is added as
(B_scaled @ A).T. Biases are untouched: LoRA has no bias term (the loader refuses `bias` / `lora_bias`).

Only LoRA merges. A bottleneck adapter (AdapterHub) computes h + up(f(down(LN(h)))): a non-linear
activation f sits between its projections, and it reads the residual stream rather than a layer's input,
so no change of any one weight matrix reproduces it; `require_mergeable` refuses it by name.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bottleneck_loading import BottleneckAdapter
from .errors import AdapterLoadError
from .layers import BankedLinear
from .lora_loading import LoraAdapter

BOTTLENECK_NOT_MERGEABLE = (
    "a bottleneck adapter cannot be merged into the base weights: it is non-linear (an activation "
    "between its down and up projections) and reads the residual stream, so it cannot be folded into "
    "a weight matrix; serve it unmerged"
)


def require_mergeable(adapter: object) -> LoraAdapter:
    """`adapter` itself when it is a LoraAdapter.

    Raises AdapterLoadError (naming the adapter) for a BottleneckAdapter, TypeError for anything else.
    """
    if isinstance(adapter, LoraAdapter):
        return adapter
    if isinstance(adapter, BottleneckAdapter):
        raise AdapterLoadError(adapter.adapter_id, BOTTLENECK_NOT_MERGEABLE)
    raise TypeError(f"only a LoraAdapter can be merged into the base weights, got {type(adapter).__name__}")


def merged_weights(model: nn.Module, adapter: LoraAdapter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The merged weight of every module `adapter` adapts; `model` is not modified.

    Keys are the weights' keys in `model.state_dict()`: f"{name}.weight" (f"{name}.base.weight" where the
    layer is wrapped in a BankedLinear). Values are new tensors of `dtype` on the weight's device, shaped
    like the base weight: [out, in] for nn.Linear, [in, out] for Conv1D.

    Raises AdapterLoadError, listing every problem, when a module is absent from `model`, is not a
    Linear / Conv1D, has a weight tied to another parameter (merging would change that one too), or
    does not fit the adapter's shapes; TypeError / AdapterLoadError for a non-LoRA adapter.
    """
    adapter = require_mergeable(adapter)
    owners = _owners_by_parameter(model)
    problems: list[str] = []
    merged: dict[str, torch.Tensor] = {}
    for name, weights in adapter.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problems.append(f"{name}: no such module in the model")
            continue
        key = f"{name}.weight"
        if isinstance(module, BankedLinear):
            module, key = module.base, f"{name}.base.weight"
        if isinstance(module, nn.Linear):
            out_features, in_features = module.weight.shape
        elif isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
        else:
            problems.append(f"{name}: is a {type(module).__name__}, not a Linear / Conv1D layer")
            continue
        a, b = weights.a, weights.b_scaled
        rank = a.shape[0] if a.dim() == 2 else -1
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            problems.append(
                f"{name}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the {type(module).__name__} "
                f"(expected ({rank}, {in_features}) / ({out_features}, {rank}))"
            )
            continue
        tied = sorted(owners[id(module.weight)] - {key})
        if tied:
            problems.append(f"{name}: its weight is tied to {', '.join(tied)}; merging would change that too")
            continue
        base = module.weight.detach()
        delta = b.to(device=base.device, dtype=torch.float32) @ a.to(device=base.device, dtype=torch.float32)
        if isinstance(module, Conv1D):
            delta = delta.T
        merged[key] = (base.to(torch.float32) + delta).to(dtype)
    if problems:
        raise AdapterLoadError(adapter.adapter_id, problems)
    return merged


def merge_into(model: nn.Module, adapter: LoraAdapter, dtype: torch.dtype) -> None:
    """Merge `adapter` into `model` in place and cast the whole model to `dtype`.

    Every merged weight is computed (and every check passed) before anything changes, so a refused
    adapter leaves `model` as it was. The merge is done in float32 from the weights as they are before
    the cast.
    """
    merged = merged_weights(model, adapter, dtype)
    model.to(dtype)
    parameters = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for key, value in merged.items():
            parameters[key].copy_(value)


def _owners_by_parameter(model: nn.Module) -> dict[int, set[str]]:
    """For each parameter (by identity), every name it has in the model: more than one when tied."""
    owners: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), set()).add(name)
    return owners
