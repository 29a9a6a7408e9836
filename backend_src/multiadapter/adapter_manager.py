"""The adapter cache: device slots and host memory, each bounded in bytes, over the adapter store.

Tiers, fastest first:

- **device**: the bank's slots (`bank.py`), what a forward can route rows to. Bounded by `device_bytes` (each
  adapter's own tensors, at its rank or width) and by the bank's slot count.
- **host**: validated tensors ready to copy in, so a device miss does not read and validate the files again.
  Bounded by `host_bytes`. A device-resident adapter may keep its host copy (inclusive tiers).
- **store**: the folders under `ADAPTER_DIR` (`adapter_store.py`), read on first use.

A request's adapter is *acquired* (one reference per running sequence) and *released* when the sequence ends.
An adapter with references is never evicted, and its slot is never reused under it. When a budget is full, the
least recently used unreferenced, unpinned adapter goes (device -> host copy kept if it fits -> dropped).

The store is checked, at most every `check_interval_s` per adapter, when a request asks for it: a new folder
is servable, a changed one (its `Fingerprint`) is read again on its next request, and the sequences already
running finish on the version they started with (the old version keeps its slot until they release it); a
deleted folder is NOT_FOUND. A folder that fails validation is refused with its reason until its files change.

Loads from the store run on one loader thread; only the requests that need that adapter wait, and requests
for one cold adapter share one load. Thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from .adapter_ids import BASE_ADAPTER_ID
from .adapter_store import Adapter, AdapterStore, Fingerprint, kind_and_shape
from .bank import BASE_ENTRY, AdapterBank, BankEntry
from .errors import AdapterLoadError, AdapterNotFound, RequestError, Unavailable

log = logging.getLogger(__name__)

DEVICE, HOST, STORE = "device", "host", "store"
# How often (seconds, per adapter) a request compares the store's files with what was loaded.
DEFAULT_CHECK_INTERVAL_S = 1.0

Ready = Callable[[BankEntry | None, RequestError | None], None]


class NoRoom(Unavailable):
    """The device budget is held by adapters in use (or pinned): nothing can be evicted now."""


@dataclass(frozen=True)
class CacheBudgets:
    """device_bytes / host_bytes: bytes of adapter tensors each tier may hold. pinned: ids never evicted
    from the device once loaded. check_interval_s: how stale a look at the store may be."""

    device_bytes: int = 1 << 30
    host_bytes: int = 2 << 30
    pinned: frozenset[str] = frozenset()
    check_interval_s: float = DEFAULT_CHECK_INTERVAL_S


@dataclass(eq=False)
class _Version:
    """One loaded version of an adapter: its host copy (None once dropped from the host tier), its device
    entry (None when not resident), and the sequences using it."""

    adapter_id: str
    version: str
    nbytes: int
    kind: str
    shape: str
    fingerprint: Fingerprint
    host: Adapter | None = None
    entry: BankEntry | None = None
    refs: int = 0
    last_used: int = 0
    current: bool = True  # False once the store replaced or deleted it


@dataclass(eq=False)
class _Load:
    """A load in progress for one adapter id, and who waits for it."""

    waiters: list[Ready] = field(default_factory=list)


@dataclass(frozen=True)
class AdapterListing:
    """One adapter of the listing: tier is device / host / store, or refused (with its reason)."""

    adapter_id: str
    tier: str
    kind: str = ""
    shape: str = ""
    version: str = ""
    nbytes: int = 0
    pinned: bool = False
    in_use: int = 0
    reason: str = ""


class AdapterManager:
    """Keeps the adapters requests ask for on the device, within the budgets."""

    def __init__(
        self,
        store: AdapterStore | None,
        bank: AdapterBank,
        budgets: CacheBudgets | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        background: bool = True,
        base_entry: BankEntry = BASE_ENTRY,
    ) -> None:
        self.store = store
        self.base_entry = base_entry  # what the bare base answers with (its version names a quantization)
        self.bank = bank
        self.budgets = budgets or CacheBudgets()
        self._clock = clock
        self._current: dict[str, _Version] = {}
        self._by_slot: dict[int, _Version] = {}
        self._refused: dict[str, tuple[Fingerprint | None, str]] = {}
        self._checked: dict[str, float] = {}
        self._loads: dict[str, _Load] = {}
        # Loads waiting for room on the device: retried whenever an adapter's last reference is released.
        self._parked: list[str] = []
        self._tick = itertools.count(1)
        self._lock = threading.RLock()
        # background False runs loads in the caller's thread (tests, the offline engine).
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="adapter-loader") if background else None
        self.loads = 0  # adapters read from the store (validated)
        self.device_loads = 0  # adapters copied onto the device (from the store or the host tier)
        self.evictions = 0
        self.load_seconds = 0.0  # time spent reading and validating adapters from the store

    # --- requests -------------------------------------------------------------------------------------

    def acquire(self, adapter_id: str) -> BankEntry | None:
        """The device entry serving `adapter_id` now, with one reference taken (release it), or None when
        it must be loaded first (`acquire_later`). '' is the base. Raises AdapterNotFound when the store
        has no such adapter, or refuses it (with the reason)."""
        if adapter_id == BASE_ADAPTER_ID:
            return self.base_entry
        with self._lock:
            self._check(adapter_id)
            version = self._current.get(adapter_id)
            if version is None or version.entry is None:
                return None
            self._use(version)
            return version.entry

    def acquire_later(self, adapter_id: str, ready: Ready) -> None:
        """Load `adapter_id` onto the device, then call `ready(entry, None)` with one reference taken for
        this caller, or `ready(None, error)`. Concurrent callers for one adapter share one load. When the
        adapters in use fill the device, the load waits until one of them is released. `ready` runs on
        the loader thread (or in this thread when the adapter is resident meanwhile)."""
        with self._lock:
            try:
                entry = self.acquire(adapter_id)
            except RequestError as exc:
                entry, error = None, exc
            else:
                error = None
            if entry is None and error is None:
                load = self._loads.get(adapter_id)
                if load is None:
                    load = self._loads[adapter_id] = _Load()
                    start = True
                else:
                    start = False
                load.waiters.append(ready)
        if entry is not None or error is not None:
            ready(entry, error)
            return
        if start:
            self._start(adapter_id)

    def acquire_now(self, adapter_id: str, timeout_s: float | None = None) -> BankEntry:
        """`acquire`, loading the adapter first if needed (this thread waits). Raises RequestError."""
        entry = self.acquire(adapter_id)
        if entry is not None:
            return entry
        done = threading.Event()
        outcome: list[tuple[BankEntry | None, RequestError | None]] = []

        def ready(entry: BankEntry | None, error: RequestError | None) -> None:
            outcome.append((entry, error))
            done.set()

        self.acquire_later(adapter_id, ready)
        if not done.wait(timeout_s):
            raise Unavailable(f"adapter {adapter_id!r} did not load within {timeout_s} s")
        entry, error = outcome[0]
        if error is not None:
            raise error
        assert entry is not None
        return entry

    def release(self, entry: BankEntry) -> None:
        """Drop one reference taken by `acquire*`. A replaced or deleted version leaves the device with its
        last reference."""
        if entry.slot == BASE_ENTRY.slot:
            return
        with self._lock:
            version = self._by_slot.get(entry.slot)
            if version is None or version.entry is not entry:
                return
            version.refs -= 1
            version.last_used = next(self._tick)
            if version.refs:
                return
            if not version.current:
                self._evict_device(version)
            parked, self._parked = self._parked, []
        for adapter_id in parked:
            self._start(adapter_id)

    def _start(self, adapter_id: str) -> None:
        if self._loader is None:
            self._load(adapter_id)
        else:
            self._loader.submit(self._load, adapter_id)

    # --- start-up -------------------------------------------------------------------------------------

    def preload(self, adapter_ids: Iterable[str]) -> list[str]:
        """Load these adapters in order (pinned ones first) while they fit without evicting one another;
        the ids loaded. One that is refused or does not fit is logged and stays in the store."""
        ordered = sorted(adapter_ids, key=lambda a: a not in self.budgets.pinned)
        loaded = []
        for adapter_id in ordered:
            try:
                with self._lock:
                    self._check(adapter_id)
                self._load_to_device(adapter_id, evict=False)
            except Unavailable:
                log.info("adapter %r stays in the store: the device budget is full", adapter_id)
                continue
            except RequestError as exc:
                log.warning("adapter %r not preloaded: %s", adapter_id, exc)
                continue
            loaded.append(adapter_id)
        return loaded

    def evict(self, adapter_id: str) -> bool:
        """Take `adapter_id` off the device now (its host copy stays, within the host budget); False when
        it is not resident or in use."""
        with self._lock:
            version = self._current.get(adapter_id)
            if version is None or version.entry is None or version.refs:
                return False
            self._evict_device(version)
            return True

    def stop(self) -> None:
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=False)

    # --- what is where ----------------------------------------------------------------------------------

    @property
    def refused(self) -> dict[str, str]:
        with self._lock:
            return {adapter_id: reason for adapter_id, (_, reason) in self._refused.items()}

    def usage(self) -> dict[str, int]:
        """Bytes and slots in use against the budgets."""
        with self._lock:
            versions = self._versions()
            return {
                "device_bytes": sum(v.nbytes for v in versions if v.entry is not None),
                "device_budget": self.budgets.device_bytes,
                "slots": len(self.bank),
                "slot_capacity": self.bank.capacity,
                "host_bytes": sum(v.nbytes for v in versions if v.host is not None),
                "host_budget": self.budgets.host_bytes,
            }

    def counters(self) -> dict[str, float]:
        """The cache's state for a metrics endpoint: adapters and bytes per tier, budgets, and the totals of
        store reads (and their seconds), copies onto the device, and evictions from the device."""
        with self._lock:
            versions = self._versions()
            return {
                "device_adapters": sum(1 for v in versions if v.entry is not None),
                "host_adapters": sum(1 for v in versions if v.host is not None),
                "device_bytes": sum(v.nbytes for v in versions if v.entry is not None),
                "device_budget": self.budgets.device_bytes,
                "host_bytes": sum(v.nbytes for v in versions if v.host is not None),
                "host_budget": self.budgets.host_bytes,
                "store_reads": self.loads,
                "store_read_seconds": self.load_seconds,
                "device_loads": self.device_loads,
                "evictions": self.evictions,
            }

    def listing(self) -> list[AdapterListing]:
        """Every adapter of the store (and replaced versions still running), with its tier. Adapters only in
        the store are described from their files (`AdapterStore.peek`), outside the lock."""
        with self._lock:
            rows = []
            store_ids = self.store.ids() if self.store is not None else []
            for adapter_id in sorted({*store_ids, *self._current, *self._refused}):
                version = self._current.get(adapter_id)
                if adapter_id in self._refused:
                    rows.append(AdapterListing(adapter_id, "refused", reason=self._refused[adapter_id][1]))
                elif version is None:
                    rows.append(AdapterListing(adapter_id, STORE))
                else:
                    rows.append(self._row(version))
            rows.extend(self._row(v) for v in self._by_slot.values() if not v.current)
        if self.store is not None:
            for i, row in enumerate(rows):
                if row.tier == STORE and not row.version:
                    kind, shape, nbytes = self.store.peek(row.adapter_id)
                    rows[i] = replace(row, kind=kind, shape=shape, nbytes=nbytes)
        return rows

    def _row(self, version: _Version) -> AdapterListing:
        tier = DEVICE if version.entry is not None else HOST if version.host is not None else STORE
        return AdapterListing(
            version.adapter_id,
            tier if version.current else f"{tier} (replaced, finishing)",
            version.kind,
            version.shape,
            version.version,
            version.nbytes,
            version.adapter_id in self.budgets.pinned,
            version.refs,
        )

    # --- inside the lock ------------------------------------------------------------------------------

    def _versions(self) -> list[_Version]:
        return [*self._current.values(), *(v for v in self._by_slot.values() if not v.current)]

    def _use(self, version: _Version) -> None:
        version.refs += 1
        version.last_used = next(self._tick)

    def _check(self, adapter_id: str) -> None:
        """Compare the store with what is loaded for `adapter_id` (at most every check_interval_s); raise
        AdapterNotFound when the store has no such adapter or refuses this content."""
        now = self._clock()
        last = self._checked.get(adapter_id)
        if last is None or now - last >= self.budgets.check_interval_s:
            self._checked[adapter_id] = now
            fingerprint = self.store.fingerprint(adapter_id) if self.store is not None else None
            version = self._current.get(adapter_id)
            if version is not None and version.fingerprint != fingerprint:
                self._retire(version)
            refusal = self._refused.get(adapter_id)
            if refusal is not None and refusal[0] != fingerprint:
                del self._refused[adapter_id]  # its files changed: try again
            if fingerprint is None:
                self._refused.pop(adapter_id, None)
                self._checked.pop(adapter_id, None)
                raise AdapterNotFound(adapter_id)
        if adapter_id in self._refused:
            raise AdapterNotFound(adapter_id, refused_because=self._refused[adapter_id][1])

    def _retire(self, version: _Version) -> None:
        """The store no longer holds `version`: new requests never get it; it leaves the device with its
        last reference."""
        log.info("adapter %r %s changed or left the store", version.adapter_id, version.version)
        version.current = False
        version.host = None
        if self._current.get(version.adapter_id) is version:
            del self._current[version.adapter_id]
        if version.entry is not None and version.refs == 0:
            self._evict_device(version)

    def _evict_device(self, version: _Version) -> None:
        assert version.entry is not None and version.refs == 0
        self.bank.remove(version.entry.slot)
        del self._by_slot[version.entry.slot]
        version.entry = None
        if version.current:
            self.evictions += 1
            if version.host is None:
                del self._current[version.adapter_id]  # dropped: back to the store tier

    def _make_room_on_device(self, nbytes: int, adapter_id: str, evict: bool = True) -> None:
        """Evict unreferenced, unpinned adapters, least recently used first, until `nbytes` more fit.
        Raises Unavailable when adapters in use (or pinned, or `evict` False) hold the room."""
        resident = [v for v in self._versions() if v.entry is not None]
        used = sum(v.nbytes for v in resident)
        slots = len(resident)
        candidates = sorted(
            (v for v in resident if v.refs == 0 and v.adapter_id not in self.budgets.pinned),
            key=lambda v: v.last_used,
        )
        while used + nbytes > self.budgets.device_bytes or slots >= self.bank.capacity:
            if not candidates or not evict:
                raise NoRoom(
                    f"no room on the device for adapter {adapter_id!r}: the adapters resident are in use "
                    "by running requests or pinned; retry later"
                )
            victim = candidates.pop(0)
            log.info("evicting adapter %r %s from the device", victim.adapter_id, victim.version)
            used -= victim.nbytes
            slots -= 1
            self._evict_device(victim)

    def _keep_on_host(self, version: _Version) -> None:
        """Keep `version`'s host copy if it fits the host budget after dropping older unreferenced copies."""
        if version.nbytes > self.budgets.host_bytes:
            version.host = None
            return
        held = [v for v in self._versions() if v.host is not None and v is not version]
        held.sort(key=lambda v: v.last_used)
        used = sum(v.nbytes for v in held)
        while used + version.nbytes > self.budgets.host_bytes and held:
            victim = held.pop(0)
            used -= victim.nbytes
            victim.host = None
            if victim.entry is None and victim.current:
                del self._current[victim.adapter_id]  # neither tier holds it any more

    # --- the loader thread -----------------------------------------------------------------------------

    def _load(self, adapter_id: str) -> None:
        try:
            entry = self._load_to_device(adapter_id)
        except NoRoom as exc:
            with self._lock:
                if any(v.refs for v in self._versions()):
                    # Running sequences hold the room: wait for one of them to release its adapter.
                    self._parked.append(adapter_id)
                    return
            entry, error = None, exc
        except RequestError as exc:
            entry, error = None, exc
        except Exception as exc:  # noqa: BLE001 - a bug must still answer every waiter
            log.exception("loading adapter %r failed", adapter_id)
            entry, error = None, Unavailable(f"loading adapter {adapter_id!r} failed: {exc}")
        else:
            error = None
        with self._lock:
            waiters = self._loads.pop(adapter_id).waiters
            if entry is not None:
                version = self._by_slot[entry.slot]
                for _ in waiters:
                    self._use(version)
        for ready in waiters:
            try:
                ready(entry, error)
            except Exception:  # noqa: BLE001 - one waiter's bug must not starve the others
                log.exception("an adapter waiter failed")

    def _load_to_device(self, adapter_id: str, evict: bool = True) -> BankEntry:
        assert self.store is not None
        fingerprint = self.store.fingerprint(adapter_id)
        if fingerprint is None:
            raise AdapterNotFound(adapter_id)
        with self._lock:
            version = self._current.get(adapter_id)
            if version is not None and version.fingerprint != fingerprint:
                self._retire(version)
                version = None
            host = version.host if version is not None else None
        if host is None:
            started = self._clock()
            try:
                host = self.store.load(adapter_id)
            except AdapterLoadError as exc:
                reason = "; ".join(exc.problems)
                with self._lock:
                    self._refused[adapter_id] = (fingerprint, reason)
                    self._checked[adapter_id] = self._clock()
                log.error("%s", exc)
                raise AdapterNotFound(adapter_id, refused_because=reason) from exc
            if host.nbytes > self.budgets.device_bytes:
                reason = (
                    f"its {host.nbytes} bytes exceed the device budget for adapters "
                    f"({self.budgets.device_bytes} bytes)"
                )
                with self._lock:
                    self._refused[adapter_id] = (fingerprint, reason)
                    self._checked[adapter_id] = self._clock()
                raise AdapterNotFound(adapter_id, refused_because=reason)
            with self._lock:
                self.loads += 1
                self.load_seconds += self._clock() - started
            log.info(
                "adapter %r %s read from the store in %.3f s (%d bytes)",
                adapter_id,
                host.version,
                self._clock() - started,
                host.nbytes,
            )
        with self._lock:
            version = self._current.get(adapter_id)
            if version is None or version.fingerprint != fingerprint:
                if version is not None:
                    self._retire(version)
                kind, shape = kind_and_shape(host)
                version = _Version(adapter_id, host.version, host.nbytes, kind, shape, fingerprint, host)
                self._current[adapter_id] = version
            version.host = host
            if version.entry is None:
                try:
                    self._make_room_on_device(version.nbytes, adapter_id, evict)
                except Unavailable:
                    self._keep_on_host(version)  # read and validated: ready for the next try
                    if version.host is None:
                        del self._current[adapter_id]
                    raise
                version.entry = self.bank.add(host)
                self.device_loads += 1
                self._by_slot[version.entry.slot] = version
                log.info(
                    "adapter %r %s on the device in slot %d", adapter_id, version.version, version.entry.slot
                )
            version.host = host
            version.last_used = next(self._tick)
            self._keep_on_host(version)
            self._checked[adapter_id] = self._clock()
            return version.entry
