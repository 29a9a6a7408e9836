"""A KV cache that appends in place: the model's `DynamicCache`, without a concatenation per step.

transformers' `DynamicLayer.update` concatenates each step's keys and values onto the cache, copying the whole
cache of every layer at every step (B rows x T positions, twice per layer): on a CPU the largest cost of a
decode step after the weights. `GrowingLayer` keeps the cache in a buffer with spare positions and writes each
step's new positions into it; `keys` / `values` are views of the filled part, so attention reads exactly what
it read before. The buffer grows by doubling (amortized O(1) copies per position).

The engine loop also reshapes caches between steps (rows join, leave, padding columns are cut): it assigns
new tensors to `keys` / `values`, and the next `update` adopts them into a fresh buffer (one copy, which those
reshapes already paid for).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

MIN_SPARE = 64  # positions of room added at least, when a buffer is (re)made


class GrowingLayer(DynamicLayer):
    """keys / values: [B, H, T, D] views of buffers [B, H, capacity, D]."""

    def __init__(self) -> None:
        super().__init__()
        self._keys_buffer: torch.Tensor | None = None
        self._values_buffer: torch.Tensor | None = None

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        cache_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        new = key_states.shape[-2]
        if not self._owns_keys() or length + new > self._keys_buffer.shape[-2]:
            self._adopt(length, new, key_states, value_states)
        end = length + new
        self._keys_buffer[:, :, length:end] = key_states
        self._values_buffer[:, :, length:end] = value_states
        self.keys = self._keys_buffer[:, :, :end]
        self.values = self._values_buffer[:, :, :end]
        return self.keys, self.values

    def _owns_keys(self) -> bool:
        """Whether `keys` / `values` are still the views of this layer's buffers (nobody replaced them)."""
        buffer = self._keys_buffer
        return (
            buffer is not None
            and self.keys.numel() > 0
            and self.keys.data_ptr() == buffer.data_ptr()
            and self.keys.shape[:2] == buffer.shape[:2]
            and self.keys.stride() == buffer.stride()
            and self.values.data_ptr() == self._values_buffer.data_ptr()
        )

    def _adopt(self, length: int, new: int, key_like: torch.Tensor, value_like: torch.Tensor) -> None:
        """Buffers with room for `length + new` positions and more, holding the current keys / values."""
        capacity = max(2 * (length + new), length + new + MIN_SPARE)
        keys = key_like.new_empty(*key_like.shape[:2], capacity, key_like.shape[-1])
        values = value_like.new_empty(*value_like.shape[:2], capacity, value_like.shape[-1])
        if length:
            keys[:, :, :length] = self.keys
            values[:, :, :length] = self.values
        self._keys_buffer, self._values_buffer = keys, values


def growing_cache(layers: int) -> DynamicCache:
    """An empty cache of `layers` GrowingLayers, for a model's first forward."""
    cache = DynamicCache()
    cache.layers = [GrowingLayer() for _ in range(layers)]
    cache.layer_class_to_replicate = None
    return cache


def growing_from(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding `pairs` (per layer: keys, values [B, H, T, D]) whose next update adopts them."""
    cache = growing_cache(len(pairs))
    for layer, (keys, values) in zip(cache.layers, pairs, strict=True):
        layer.lazy_initialization(keys)
        layer.keys, layer.values = keys, values
    return cache
