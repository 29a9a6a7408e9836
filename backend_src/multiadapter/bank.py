"""The adapter bank: resident adapters by slot beside one frozen base model.

Inside the math adapters are slots (internal integers); `BASE_SLOT` means the bare base. Which slot serves
an adapter id is decided by the adapter manager (`adapter_manager.py`). The bank fills and frees slots while
serving: `add` stores an adapter's weights in every layer it targets (LoRA) or every place it adapts
(bottleneck), `remove` frees the slot for the next one. Both kinds share the slots. A batch's rows and their
slots are a `BatchAdapters` (`batch(slots)`, kept across steps by the engine loop: batch_adapters.py);
`routing(batch)` installs, for the forwards run inside it, which rows use which adapter, so one forward pass
serves the whole mixed batch: LoRA, bottleneck and base rows together.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapter_ids import BASE_ADAPTER_ID
from .base_model import banked_layer, bottleneck_site
from .batch_adapters import BatchAdapters
from .bottleneck import BankedBottleneck, BottleneckPlace
from .bottleneck_loading import BottleneckAdapter
from .errors import Unavailable
from .layers import BankedLinear
from .lora_loading import LoraAdapter

BASE_SLOT = -1


@dataclass(frozen=True)
class BankEntry:
    """A resident adapter: its slot, content version, adapted modules (LoRA) or places (bottleneck),
    and device bytes."""

    adapter_id: str
    version: str
    slot: int
    modules: tuple[str, ...]
    nbytes: int
    places: tuple[BottleneckPlace, ...] = ()


BASE_ENTRY = BankEntry(BASE_ADAPTER_ID, "", BASE_SLOT, (), 0)


class AdapterBank:
    """Up to `capacity` resident adapters, by slot. Thread-safe; one routed batch at a time.

    Two versions of one adapter id may be resident at once (a replaced version keeps its slot until the
    sequences that started on it finish); which entry serves an id is the adapter manager's business.
    """

    def __init__(self, model: nn.Module, capacity: int, lora_dtype: torch.dtype | None = None):
        """lora_dtype: the dtype LoRA weights are kept and deltas computed in (None: each layer's weight
        dtype; float32 over a quantized base)."""
        if capacity < 1:
            raise ValueError("bank capacity must be at least 1")
        self._model = model
        self.capacity = capacity
        self.lora_dtype = lora_dtype
        self._entries: dict[int, BankEntry] = {}
        self._layers: dict[str, BankedLinear] = {}
        self._sites: dict[BottleneckPlace, BankedBottleneck] = {}
        self._lock = threading.RLock()
        self._epoch = 0  # bumped by every add and remove: routes made before are remade

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def entries(self) -> list[BankEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.slot)

    def add(self, adapter: LoraAdapter | BottleneckAdapter) -> BankEntry:
        """Store `adapter` in a free slot (its tensors are copied to the bank's device and dtype).
        Raises Unavailable when every slot is taken."""
        with self._lock:
            free = next((s for s in range(self.capacity) if s not in self._entries), None)
            if free is None:
                raise Unavailable(f"adapter bank is full ({self.capacity} slots)")
            if isinstance(adapter, BottleneckAdapter):
                for place, weights in adapter.places.items():
                    site = self._sites.get(place) or bottleneck_site(self._model, place)
                    site.store(free, weights)
                    self._sites[place] = site
                modules, places = (), tuple(adapter.places)
            else:
                for name, weights in adapter.modules.items():
                    layer = self._layers.get(name) or banked_layer(self._model, name, self.lora_dtype)
                    layer.store(free, weights.a, weights.b_scaled)
                    self._layers[name] = layer
                modules, places = tuple(adapter.modules), ()
            entry = BankEntry(adapter.adapter_id, adapter.version, free, modules, adapter.nbytes, places)
            self._entries[free] = entry
            self._epoch += 1
            return entry

    def remove(self, slot: int) -> None:
        """Free `slot` for the next adapter. Raises KeyError if it holds none."""
        with self._lock:
            entry = self._entries.pop(slot)
            for name in entry.modules:
                self._layers[name].drop(entry.slot)
            for place in entry.places:
                self._sites[place].drop(entry.slot)
            self._epoch += 1

    def batch(self, slots: Sequence[int]) -> BatchAdapters:
        """A batch whose row i uses bank slot slots[i]; keep it while the batch runs (`select`, `extend`)."""
        return BatchAdapters(slots)

    def select(self, batch: BatchAdapters, order: Sequence[int]) -> None:
        """Keep `batch`'s rows `order` (new row i is old row order[i]), as the caller did with its rows."""
        with self._lock:
            batch.select(order)

    def extend(self, batch: BatchAdapters, other: BatchAdapters) -> None:
        """Append `other`'s rows to `batch`'s."""
        with self._lock:
            batch.extend(other)

    @contextmanager
    def routing(self, rows: Sequence[int] | BatchAdapters) -> Iterator[BatchRouting]:
        """Route each batch row to its slot (`rows`: the slots, or a kept `BatchAdapters`) for the forwards
        run inside the block. The bank's lock is held throughout: no adapter comes or goes under a forward."""
        batch = rows if isinstance(rows, BatchAdapters) else self.batch(rows)
        with self._lock:
            routing = BatchRouting(self, batch)
            routing.install()
            try:
                yield routing
            finally:
                routing.clear()

    def _install(self, batch: BatchAdapters) -> list[nn.Module]:
        """Install `batch`'s routes in every banked layer and bottleneck site; the modules routed."""
        modules: list[nn.Module] = [*self._layers.values(), *self._sites.values()]
        routes = batch.routes(list(self._layers.values()), list(self._sites.values()), self._epoch)
        for module, route in zip(modules, routes, strict=True):
            _set_route(module, route)
        return modules


class BatchRouting:
    """The routes of one batch, installed while `AdapterBank.routing` holds the bank's lock; `select` or
    `set_slots` when the batch's rows change between forwards."""

    def __init__(self, bank: AdapterBank, batch: BatchAdapters):
        self._bank = bank
        self.batch = batch
        self._modules: list[nn.Module] = []

    def install(self) -> None:
        self._modules = self._bank._install(self.batch)

    def select(self, order: Sequence[int]) -> None:
        """Keep rows `order` (new row i is old row order[i]) and route the forwards that follow."""
        self.batch.select(order)
        self.install()

    def set_slots(self, slots: Sequence[int]) -> None:
        """Other rows altogether (nothing is remade when they are the batch's rows already)."""
        if list(slots) != self.batch.slots:
            self.batch.assign(slots)
        self.install()

    def clear(self) -> None:
        for module in self._modules:
            _set_route(module, None)


def _set_route(module: nn.Module, route: object) -> None:
    """`module.route = route` without `nn.Module.__setattr__`'s checks for parameters, buffers and submodules
    (`route` is none of them): installing and clearing every layer's route is done twice per forward step,
    and those checks made it cost 0.45 ms per step on the bench model (80 modules)."""
    object.__setattr__(module, "route", route)
