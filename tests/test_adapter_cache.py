"""The adapter cache over the store (`multiadapter.adapter_manager`), in-process, on real PEFT adapters.

- A table of transitions: load, hit, evict by bytes (device -> host -> dropped), pin, in use, replace,
  delete, refuse, fix, too big for the device.
- Random operation sequences: the budgets are never exceeded, and an adapter a sequence holds is never
  evicted or replaced under it.
- The engine with a device budget smaller than its working set answers exactly what an engine with every
  adapter resident answers.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from multiadapter.adapter_manager import DEVICE, HOST, STORE, AdapterManager, CacheBudgets
from multiadapter.adapter_store import AdapterStore
from multiadapter.bank import AdapterBank, BankEntry
from multiadapter.base_model import describe_modules
from multiadapter.errors import AdapterNotFound, Unavailable
from multiadapter.lora_loading import WEIGHTS_FILE, load_lora_adapter
from transformers import AutoModelForCausalLM

from tests.peft_factories import build_adapter, build_base

IDS = ("a", "b", "c", "d")
SEQUENCES = 6
EXERCISED: dict[int, tuple[int, int]] = {}  # seed -> (evictions, most loads parked at once)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A tiny Llama and, per id, two different versions of a rank-4 LoRA adapter (same size)."""
    root = tmp_path_factory.mktemp("cache")
    base = build_base("llama", root / "base")
    versions = {}
    for i, adapter_id in enumerate(IDS):
        versions[adapter_id] = [
            build_adapter(
                base,
                root / "src" / f"{adapter_id}{v}",
                seed=10 * i + v,
                r=4,
                lora_alpha=8,
                target_modules=["q_proj", "v_proj"],
            )
            for v in (1, 2)
        ]
    return base, versions


class Cache:
    """A manager over a store of real adapter folders, with synchronous loads and a manual clock. Budgets
    are in units of one adapter's bytes (every adapter here has the same shape)."""

    def __init__(
        self,
        base: Path,
        store_dir: Path,
        *,
        slots: int = 8,
        device: float = 2,
        host: float = 3,
        pinned: frozenset[str] = frozenset(),
    ) -> None:
        self.base = base
        model = AutoModelForCausalLM.from_pretrained(base)
        self.modules = modules = describe_modules(model)
        self.store_dir = store_dir
        self.store = AdapterStore(store_dir, lambda adapter_id, d: load_lora_adapter(adapter_id, d, modules))
        self.bank = AdapterBank(model, slots)
        self.now = 0.0
        self.unit = load_lora_adapter("a", store_dir / "a", modules).nbytes
        self.manager = AdapterManager(
            self.store,
            self.bank,
            CacheBudgets(int(device * self.unit), int(host * self.unit), pinned, check_interval_s=1.0),
            clock=lambda: self.now,
            background=False,
        )

    def tiers(self) -> dict[str, str]:
        return {row.adapter_id: row.tier for row in self.manager.listing()}

    def check_budgets(self) -> None:
        usage = self.manager.usage()
        assert usage["device_bytes"] <= usage["device_budget"], usage
        assert usage["host_bytes"] <= usage["host_budget"], usage
        assert usage["slots"] <= usage["slot_capacity"], usage
        assert sum(e.nbytes for e in self.bank.entries()) == usage["device_bytes"]


def put(sources, store_dir: Path, adapter_id: str, version: int = 1) -> None:
    """Copy version 1 or 2 of `adapter_id` into the store (replacing what is there)."""
    target = store_dir / adapter_id
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(sources[1][adapter_id][version - 1], target)


def store_with_all(sources, tmp_path: Path) -> Path:
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    for adapter_id in IDS:
        put(sources, store_dir, adapter_id)
    return store_dir


@pytest.fixture
def cache(sources, tmp_path):
    return Cache(sources[0], store_with_all(sources, tmp_path))


def test_transitions_load_hit_evict_by_bytes_and_reload_from_host(cache):
    m = cache.manager
    assert m.acquire("a") is None  # cold: it must be loaded first
    a = m.acquire_now("a")
    assert (m.loads, cache.tiers()["a"]) == (1, DEVICE)
    m.release(a)
    assert m.acquire("a") is a and m.loads == 1  # a hit reads nothing
    m.release(a)
    b = m.acquire_now("b")
    m.release(b)
    assert cache.tiers() == {"a": DEVICE, "b": DEVICE, "c": STORE, "d": STORE}
    c = m.acquire_now("c")  # the device holds two: the least recently used (a) goes, to the host tier
    m.release(c)
    assert cache.tiers() == {"a": HOST, "b": DEVICE, "c": DEVICE, "d": STORE} and m.evictions == 1
    a2 = m.acquire_now("a")  # from its host copy: no read of the store
    m.release(a2)
    assert m.loads == 3 and a2.version == a.version
    assert cache.tiers() == {"a": DEVICE, "b": HOST, "c": DEVICE, "d": STORE}
    d = m.acquire_now("d")  # host budget 3: a, b, c, d copies -> the oldest copy (b's) is dropped
    m.release(d)
    assert cache.tiers() == {"a": DEVICE, "b": STORE, "c": HOST, "d": DEVICE}
    cache.check_budgets()


def test_transitions_in_use_and_pinned_adapters_are_never_evicted(sources, tmp_path):
    cache = Cache(sources[0], store_with_all(sources, tmp_path), device=2, pinned=frozenset({"a"}))
    m = cache.manager
    assert m.preload(["b", "a", "c"]) == ["a", "b"]  # pinned first; c does not fit without evicting
    # c was read and validated once (at preload): its host copy waits for room.
    assert cache.tiers() == {"a": DEVICE, "b": DEVICE, "c": HOST, "d": STORE}
    held = m.acquire_now("b")
    ready: list[tuple[BankEntry | None, Exception | None]] = []
    m.acquire_later("c", lambda entry, error: ready.append((entry, error)))
    assert ready == [], "a is pinned and b is in use: c's load must wait"
    assert cache.tiers() == {"a": DEVICE, "b": DEVICE, "c": HOST, "d": STORE}
    assert not m.evict("b")  # not even on request while in use
    m.release(held)  # b's last reference: c's load goes on, and b goes to the host tier
    ((c, error),) = ready
    assert error is None and c is not None and c.adapter_id == "c"
    assert cache.tiers() == {"a": DEVICE, "b": HOST, "c": DEVICE, "d": STORE}
    m.release(c)
    d = m.acquire_now("d")
    m.release(d)
    assert cache.tiers()["a"] == DEVICE and cache.tiers()["c"] == HOST
    cache.check_budgets()


def test_with_nothing_in_use_pinned_adapters_alone_refuse_at_once(sources, tmp_path):
    cache = Cache(sources[0], store_with_all(sources, tmp_path), device=1, pinned=frozenset({"a"}))
    assert cache.manager.preload(["a"]) == ["a"]
    with pytest.raises(Unavailable, match="pinned"):
        cache.manager.acquire_now("b")  # nothing will ever be released: no waiting


def test_transitions_replace_keeps_the_running_version_until_released(cache, sources):
    m = cache.manager
    old = m.acquire_now("a")  # a sequence runs on version 1
    put(sources, cache.store_dir, "a", version=2)
    assert m.acquire("a") is old  # the store is looked at again only after check_interval_s
    m.release(old)
    cache.now += 1.0
    assert m.acquire("a") is None  # changed: version 2 must be loaded
    new = m.acquire_now("a")
    assert new.version != old.version and new.slot != old.slot
    versions = {(e.adapter_id, e.version) for e in cache.bank.entries()}
    assert ("a", old.version) in versions, "the running sequence's version left the device under it"
    tiers = [row.tier for row in cache.manager.listing() if row.adapter_id == "a"]
    assert tiers == [DEVICE, "device (replaced, finishing)"]
    m.release(old)  # the last sequence on version 1 ends: it leaves the device
    assert {(e.adapter_id, e.version) for e in cache.bank.entries()} == {("a", new.version)}
    m.release(new)
    cache.check_budgets()


def test_transitions_delete_refuse_fix_and_too_big(cache):
    m = cache.manager
    d = m.acquire_now("d")
    m.release(d)
    shutil.rmtree(cache.store_dir / "d")
    cache.now += 1.0
    with pytest.raises(AdapterNotFound, match="'d'"):
        m.acquire("d")
    assert "d" not in cache.tiers() and all(e.adapter_id != "d" for e in cache.bank.entries())

    broken = cache.store_dir / "e"
    shutil.copytree(cache.store_dir / "a", broken)
    data = (broken / WEIGHTS_FILE).read_bytes()
    (broken / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(AdapterNotFound, match="not a valid safetensors file"):
        m.acquire_now("e")
    loads = m.loads
    with pytest.raises(AdapterNotFound, match="not a valid safetensors file"):
        m.acquire_now("e")  # refused again without reading the files again
    assert m.loads == loads and cache.tiers()["e"] == "refused"
    (broken / WEIGHTS_FILE).write_bytes(data)  # fixed
    cache.now += 1.0
    e = m.acquire_now("e")
    assert cache.tiers()["e"] == DEVICE
    m.release(e)

    small = Cache(cache.base, cache.store_dir, device=0.5)
    with pytest.raises(AdapterNotFound, match="exceed the device budget"):
        small.manager.acquire_now("a")


def test_a_link_out_of_the_store_is_refused(cache, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(cache.store_dir / "a" / WEIGHTS_FILE, outside)
    linked = cache.store_dir / "linked"
    shutil.copytree(cache.store_dir / "a", linked)
    (linked / WEIGHTS_FILE).unlink()
    (linked / WEIGHTS_FILE).symlink_to(outside)
    with pytest.raises(AdapterNotFound, match="outside the adapter's folder"):
        cache.manager.acquire_now("linked")


@pytest.mark.parametrize("seed", range(SEQUENCES))
def test_random_operations_keep_the_budgets_and_never_evict_what_runs(sources, tmp_path, seed):
    store_dir = store_with_all(sources, tmp_path)
    rng = random.Random(seed)
    pin = seed % 3 != 0
    pinned = frozenset({"d"} if pin else ())
    cache = Cache(sources[0], store_dir, slots=3, device=2 + seed % 2, host=2, pinned=pinned)
    m = cache.manager
    held: list[BankEntry] = []
    waiting: list[str] = []  # loads parked until a release makes room
    which = {adapter_id: 1 for adapter_id in IDS}
    pinned_version = ""  # d's version while it is on the device and unchanged in the store
    parked = 0

    def ready_for(adapter_id: str):
        def ready(entry: BankEntry | None, error: Exception | None) -> None:
            waiting.remove(adapter_id)
            if error is None:
                held.append(entry)
            elif isinstance(error, Unavailable):
                assert not any(v.refs for v in m._versions()), "refused although a release would make room"
            else:
                assert isinstance(error, AdapterNotFound) and not (store_dir / adapter_id).exists(), error

        return ready

    for _ in range(120):
        op = rng.choice([*["acquire"] * 5, "release", "release", "replace", "delete", "tick"])
        adapter_id = rng.choice(IDS)
        if op == "acquire":
            waiting.append(adapter_id)
            m.acquire_later(adapter_id, ready_for(adapter_id))
            if (
                pin
                and adapter_id == "d"
                and held
                and held[-1].adapter_id == "d"
                and (store_dir / "d").exists()
            ):
                # Pinned from now on, unless the store holds other content (not looked at again yet).
                stored = load_lora_adapter("d", store_dir / "d", cache.modules).version
                pinned_version = held[-1].version if held[-1].version == stored else ""
        elif op == "release" and held:
            m.release(held.pop(rng.randrange(len(held))))
        elif op == "replace":
            which[adapter_id] = 3 - which[adapter_id]
            put(sources, store_dir, adapter_id, which[adapter_id])
            pinned_version = "" if adapter_id == "d" else pinned_version
        elif op == "delete" and (store_dir / adapter_id).exists():
            shutil.rmtree(store_dir / adapter_id)
            pinned_version = "" if adapter_id == "d" else pinned_version
        elif op == "tick":
            cache.now += 1.0
        cache.check_budgets()
        parked = max(parked, len(waiting))
        resident = {(e.slot, e.version) for e in cache.bank.entries()}
        for entry in held:
            assert (entry.slot, entry.version) in resident, "a held adapter left the device"
        if pinned_version:
            assert ("d", pinned_version) in {(e.adapter_id, e.version) for e in cache.bank.entries()}
    while held:
        m.release(held.pop())  # every parked load completes once everything is released
    assert waiting == []
    EXERCISED[seed] = (m.evictions, parked)


def test_the_random_sequences_evicted_and_parked_loads():
    assert len(EXERCISED) == SEQUENCES, "run with the random sequences"
    assert sum(evictions for evictions, _ in EXERCISED.values()) >= SEQUENCES
    assert sum(1 for _, parked in EXERCISED.values() if parked) >= SEQUENCES // 2, EXERCISED
