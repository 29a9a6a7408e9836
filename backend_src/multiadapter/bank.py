"""The adapter bank: resident adapters by slot beside one frozen base model.

Inside the math adapters are slots (internal integers); `BASE_SLOT` means the bare base. Which slot serves
an adapter id is decided by the adapter manager (`adapter_manager.py`). The bank fills and frees slots while
serving: `add` stores an adapter's weights in every layer it targets (LoRA) or every place it adapts
(bottleneck), `remove` frees the slot for the next one. Both kinds share the slots. `routing(slots)`
installs, for one batch, which rows use which adapter, so one forward pass serves the whole mixed batch:
LoRA, bottleneck and base rows together.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .adapter_ids import BASE_ADAPTER_ID
from .base_model import banked_layer, bottleneck_site
from .bottleneck import BankedBottleneck, BottleneckPlace
from .bottleneck_loading import BottleneckAdapter
from .errors import Unavailable
from .layers import BankedLinear
from .lora_loading import LoraAdapter

BASE_SLOT = -1
# Batch compositions whose routes are kept (the loop's running rows, and the rows it is prefilling).
ROUTES_KEPT = 2


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

    def __init__(self, model: nn.Module, capacity: int):
        if capacity < 1:
            raise ValueError("bank capacity must be at least 1")
        self._model = model
        self.capacity = capacity
        self._entries: dict[int, BankEntry] = {}
        self._layers: dict[str, BankedLinear] = {}
        self._sites: dict[BottleneckPlace, BankedBottleneck] = {}
        self._lock = threading.RLock()
        # Routes of the last few batch compositions: the engine loop asks for the same slots step after step
        # while no row joins or leaves, and a route's per-row weight gather is a large share of a step.
        self._routes: collections.OrderedDict[tuple[int, ...], list[object]] = collections.OrderedDict()

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
                    layer = self._layers.get(name) or banked_layer(self._model, name)
                    layer.store(free, weights.a, weights.b_scaled)
                    self._layers[name] = layer
                modules, places = tuple(adapter.modules), ()
            entry = BankEntry(adapter.adapter_id, adapter.version, free, modules, adapter.nbytes, places)
            self._entries[free] = entry
            self._routes.clear()
            return entry

    def remove(self, slot: int) -> None:
        """Free `slot` for the next adapter. Raises KeyError if it holds none."""
        with self._lock:
            entry = self._entries.pop(slot)
            for name in entry.modules:
                self._layers[name].drop(entry.slot)
            for place in entry.places:
                self._sites[place].drop(entry.slot)
            self._routes.clear()

    @contextmanager
    def routing(self, slots: Sequence[int]) -> Iterator[BatchRouting]:
        """Route batch row i to bank slot slots[i] for the forwards run inside the block."""
        with self._lock:
            routing = BatchRouting([*self._layers.values(), *self._sites.values()])
            key = tuple(slots)
            routes = self._routes.get(key)
            if routes is None:
                routing.set_slots(key)
                self._routes[key] = routing.routes()
                while len(self._routes) > ROUTES_KEPT:
                    self._routes.popitem(last=False)
            else:
                self._routes.move_to_end(key)
                routing.install(routes)
            try:
                yield routing
            finally:
                routing.clear()


class BatchRouting:
    """Per-batch routes installed in every banked layer and bottleneck place (anything with `route` and
    `make_route(slots)`); `set_slots` again when rows change."""

    def __init__(self, layers):
        self._layers = list(layers)

    def set_slots(self, slots: Sequence[int]) -> None:
        slots = list(slots)
        for layer in self._layers:
            layer.route = layer.make_route(slots)

    def routes(self) -> list[object]:
        return [layer.route for layer in self._layers]

    def install(self, routes: Sequence[object]) -> None:
        """Install routes made earlier for the same slots (`routes()`), layer by layer."""
        for layer, route in zip(self._layers, routes, strict=True):
            layer.route = route

    def clear(self) -> None:
        for layer in self._layers:
            layer.route = None
