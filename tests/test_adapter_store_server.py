"""The adapter cache and tenant routing through the real server (issue 11).

One tritonserver for this module, over a store in a temporary folder that the tests change while it serves:
a device budget that holds two of the tiny model's LoRA adapters, a host budget as small, nothing preloaded,
and a tenant policy. Every answer is compared with the in-process engine over the original adapters
(`tests.test_server.expected`); a copy of an adapter under another id has the same content, so the same
version and the same answers.

- Tenants, over HTTP and gRPC (and a stream): the default adapter, allowed adapters, the identical error for a
  forbidden and an unknown adapter, a missing or unknown tenant refused, the policy re-read when it changes.
- The store: an adapter added while serving is served; a replaced one answers from its new version while a
  stream started before the change finishes on the old one; a deleted one is NOT_FOUND; every kind of bad
  adapter fails only the requests that ask for it, with its reason, and is served once fixed.
- More adapters in use than the device holds: every answer exact, the budgets never exceeded.
- Traffic to other adapters keeps answering exactly while all of the above happens.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from client import AdapterClient, GenerateRequest, RequestFailed
from client.streaming import stream_generate
from tests.conftest import ROOT
from tests.test_server import expected

# Store id -> the tiny model's adapter whose files it starts as.
INITIAL = {"t-alpha": "alpha", "t-beta": "beta", "t-gamma": "gamma", "t-pf": "pfeiffer", "swap": "alpha"}
ACME = ["t-alpha", "t-beta", "t-gamma", "t-pf", "swap", "hot", "bad", "gone"]
POLICY = {
    "tenants": {
        "acme": {"default": "t-alpha", "allow": ACME},
        "globex": {"default": "", "allow": ["t-gamma"]},
    }
}
PROTOCOLS = ["http", "grpc"]
ADMIN_TOKEN = "storetest0token"
WAIT_S = 10.0  # how long a change may take to be seen here (the server checks every 1 s; CI is slow)
LORA_WEIGHTS = "adapter_model.safetensors"


class Store:
    """The served store, changed the way a careful operator's tools (or a Kubernetes volume) change it: each
    version of an adapter is a hidden folder of the store, and the adapter's id is a link to it, swapped
    atomically. A request sees the old files or the new ones, never a mix."""

    def __init__(self, root: Path, source: Path) -> None:
        self.root = root
        self.source = source
        self._versions = 0

    def put(self, adapter_id: str, original: str, damage: Callable[[Path], None] | None = None) -> None:
        """`adapter_id` gets `original`'s files (then `damage` applied to them), replacing what it had."""
        self._versions += 1
        version = self.root / f".{adapter_id}-{self._versions}"
        shutil.copytree(self.source / original, version)
        if damage is not None:
            damage(version)
        link = self.root / f".{adapter_id}.link"
        link.symlink_to(version.name)
        os.replace(link, self.root / adapter_id)

    def delete(self, adapter_id: str) -> None:
        (self.root / adapter_id).unlink()


@pytest.fixture(scope="module")
def store_server(tiny_model, offline_engine, tmp_path_factory):
    """(server, Store, the tenant policy's path, the device budget in bytes)."""
    root = tmp_path_factory.mktemp("store")
    store = Store(root / "adapters", tiny_model.adapter_dir)
    store.root.mkdir()
    for adapter_id, original in INITIAL.items():
        store.put(adapter_id, original)
    policy = root / "tenants.json"
    policy.write_text(json.dumps(POLICY))
    engine, _ = offline_engine
    sizes = {row.adapter_id: row.nbytes for row in engine.adapters.listing()}
    budget = sorted(sizes[original] for original in ("alpha", "beta", "gamma", "pfeiffer"))
    device_bytes = budget[-1] + budget[-2]  # the two largest fit, never three
    settings = {
        "adapter_device_bytes": str(device_bytes),
        "adapter_host_bytes": str(device_bytes),
        "preload_adapters": "",
        "tenant_policy": policy,
        # As under the launcher's supervisor: the models learn the canary's tenant from the admin token.
        "admin_token": ADMIN_TOKEN,
    }
    for server in _serve_with(tmp_path_factory.mktemp("triton-store"), tiny_model, store.root, settings):
        yield server, store, policy, device_bytes


def _serve_with(log_dir: Path, tiny_model, adapter_dir: Path, settings: dict):
    from server.process import start_server

    log_path = log_dir / "tritonserver.log"
    server = start_server(
        ROOT / "model_repository",
        tiny_model.base_model,
        adapter_dir,
        log_path=log_path,
        ready_timeout_s=600,
        engine_settings=settings,
    )
    yield server
    server.stop()
    text = log_path.read_text(errors="replace")
    assert "is not healthy" not in text, "a Python stub died during the tests"
    assert "Signal (11)" not in text and "Signal (6)" not in text, "tritonserver crashed during the tests"


def client_for(server, protocol: str = "http") -> AdapterClient:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    return AdapterClient(url, protocol=protocol, timeout_s=120)


def ask(client: AdapterClient, adapter: str, text: str = "store test", tenant: str | None = "acme", **kw):
    return client.generate(
        GenerateRequest(text, adapter, max_tokens=kw.pop("max_tokens", 8), tenant_id=tenant)
    )


def failure(call: Callable[[], object]) -> RequestFailed:
    with pytest.raises(RequestFailed) as info:
        call()
    return info.value


def error_of(call: Callable[[], object]) -> RequestFailed | None:
    """The failure of `call`, or None when it succeeds (for polling until a change is seen)."""
    try:
        call()
    except RequestFailed as exc:
        return exc
    return None


def until(condition: Callable[[], object], what: str, timeout_s: float = WAIT_S) -> float:
    """Seconds until `condition()` is truthy (RequestFailed counts as not yet); fails after `timeout_s`."""
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout_s:
        try:
            last = condition()
            if last:
                return time.monotonic() - start
        except RequestFailed as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"{what}: not seen within {timeout_s} s; last: {last}")


# --- tenants ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_tenant_is_served_its_default_and_its_allowed_adapters_exactly(
    store_server, offline_engine, protocol
):
    server = store_server[0]
    with client_for(server, protocol) as client:
        routed = ask(client, "")  # acme's default: t-alpha, a copy of alpha
        assert routed.adapter_id == "t-alpha"
        assert (routed.text, routed.adapter_version) == expected(offline_engine, "store test", "alpha", 8)
        allowed = ask(client, "t-gamma", tenant="globex")
        assert (allowed.text, allowed.adapter_version) == expected(offline_engine, "store test", "gamma", 8)
        base = ask(client, "", tenant="globex")  # globex's default is the bare base
        assert base.adapter_id == ""
        assert (base.text, base.adapter_version) == expected(offline_engine, "store test", "", 8)
        assert routed.text != base.text  # the routing is visible in the answer


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_forbidden_adapter_gets_exactly_the_error_of_one_that_does_not_exist(store_server, protocol):
    server = store_server[0]
    with client_for(server, protocol) as client:
        assert ask(client, "t-beta").adapter_id == "t-beta"  # it exists, and acme may use it
        forbidden = failure(lambda: ask(client, "t-beta", tenant="globex"))
        unknown = failure(lambda: ask(client, "no-such-adapter", tenant="globex"))
        assert forbidden.code == unknown.code == "NOT_FOUND"
        assert forbidden.message == unknown.message.replace("no-such-adapter", "t-beta"), (forbidden, unknown)
        stream_forbidden = list_failure(server, protocol, "t-beta", "globex")
        stream_unknown = list_failure(server, protocol, "no-such-adapter", "globex")
        assert stream_forbidden.code == stream_unknown.code == "NOT_FOUND"
        assert stream_forbidden.message == stream_unknown.message.replace("no-such-adapter", "t-beta")


def list_failure(server, protocol: str, adapter: str, tenant: str) -> RequestFailed:
    url = server.grpc_url if protocol == "grpc" else server.http_url
    request = GenerateRequest("store test", adapter, max_tokens=4, tenant_id=tenant)
    return failure(lambda: list(stream_generate(url, protocol, request)))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_missing_or_unknown_tenant_is_refused(store_server, protocol):
    with client_for(store_server[0], protocol) as client:
        missing = failure(lambda: ask(client, "t-alpha", tenant=None))
        assert missing.code == "INVALID_ARG" and "needs a tenant_id" in missing.message
        unknown = failure(lambda: ask(client, "t-alpha", tenant="initech"))
        assert unknown.code == "INVALID_ARG" and "'initech' is not known" in unknown.message


def test_the_supervisors_canary_passes_under_a_policy_and_its_tenant_gets_only_the_base(store_server):
    from client.health import check
    from server.config import canary_tenant

    server = store_server[0]
    tenant = canary_tenant(ADMIN_TOKEN)
    results = check(server.http_url, "http", timeout_s=60, tenant_id=tenant)  # what the supervisor sends
    assert [(r.model, r.ok) for r in results] == [("generate", True)], results
    assert not check(server.http_url, "http", timeout_s=60)[0].ok  # without it: refused for no tenant
    with client_for(server) as client:
        refused = failure(lambda: ask(client, "t-alpha", tenant=tenant))
        assert refused.code == "INVALID_ARG", refused  # the canary's tenant may not use any adapter


def test_the_policy_is_re_read_when_its_file_changes(store_server):
    server, _, policy, _ = store_server
    with client_for(server) as client:
        assert failure(lambda: ask(client, "", tenant="initech")).code == "INVALID_ARG"
        changed = json.loads(json.dumps(POLICY))
        changed["tenants"]["initech"] = {"default": "t-gamma", "allow": ["t-gamma"]}
        try:
            write_json(policy, changed)
            took = until(lambda: ask(client, "", tenant="initech").adapter_id == "t-gamma", "the new tenant")
            write_json(policy, {"tenants": {"broken": {"default": "x", "allow": []}}})  # invalid: kept out
            time.sleep(1.5)
            assert ask(client, "", tenant="initech").adapter_id == "t-gamma"  # the last good policy stands
        finally:
            write_json(policy, POLICY)
        until(
            lambda: getattr(error_of(lambda: ask(client, "", tenant="initech")), "code", None)
            == "INVALID_ARG",
            "restored",
        )
    print(f"a changed tenant policy was in force after {took:.2f} s")


def write_json(path: Path, document: object) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(json.dumps(document))
    os.replace(staged, path)


# --- the store --------------------------------------------------------------------------------------------


def test_an_adapter_added_while_serving_is_served(store_server, offline_engine):
    server, store, _, _ = store_server
    with client_for(server, "grpc") as client:
        assert failure(lambda: ask(client, "hot")).code == "NOT_FOUND"
        store.put("hot", "beta")
        took = until(lambda: ask(client, "hot"), "the new adapter")
        answer = ask(client, "hot")
        assert (answer.text, answer.adapter_version) == expected(offline_engine, "store test", "beta", 8)
    print(f"an adapter added to the store was served after {took:.2f} s")


def test_a_replaced_adapter_answers_from_its_new_version_and_a_running_stream_keeps_the_old(
    store_server, offline_engine
):
    server, store, _, _ = store_server
    text = "replace me"
    old_text, old_version = expected(offline_engine, text, "alpha", 200)
    new_text, new_version = expected(offline_engine, text, "beta", 8)
    assert old_version != new_version and old_text[:20] != new_text[:20]
    request = GenerateRequest(text, "swap", max_tokens=200, tenant_id="acme")
    chunks = stream_generate(server.grpc_url, "grpc", request)
    first = next(chunks)  # the stream runs on the old version
    assert first.adapter_version == old_version
    store.put("swap", "beta")
    with client_for(server) as client:
        took = until(lambda: ask(client, "swap", text).adapter_version == new_version, "the new version")
        answer = ask(client, "swap", text)
        assert (answer.text, answer.adapter_version) == (new_text, new_version)
    rest = list(chunks)
    assert {c.adapter_version for c in [first, *rest]} == {old_version}
    assert "".join(c.text for c in [first, *rest]) == old_text  # finished on the version it started with
    print(f"a replaced adapter answered from its new version after {took:.2f} s")


def test_a_deleted_adapter_is_not_found(store_server, offline_engine):
    server, store, _, _ = store_server
    store.put("gone", "gamma")
    with client_for(server) as client:
        until(lambda: ask(client, "gone"), "the added adapter")
        store.delete("gone")
        until(
            lambda: getattr(error_of(lambda: ask(client, "gone")), "code", None) == "NOT_FOUND",
            "the deletion",
        )
        message = failure(lambda: ask(client, "gone")).message
        assert "'gone' does not exist" in message, message


def _corrupt(d: Path) -> None:
    (d / LORA_WEIGHTS).write_bytes(b"\x00garbage" * 64)


def _truncated(d: Path) -> None:
    data = (d / LORA_WEIGHTS).read_bytes()
    (d / LORA_WEIGHTS).write_bytes(data[: len(data) // 2])


def _empty(d: Path) -> None:
    (d / LORA_WEIGHTS).write_bytes(b"")


def _pickle_only(d: Path) -> None:
    torch.save(load_file(d / LORA_WEIGHTS), d / "adapter_model.bin")
    (d / LORA_WEIGHTS).unlink()


def _link_out_of_store(d: Path) -> None:
    outside = d.parent.parent / f"outside{d.name}.safetensors"  # beside the store, not in it
    shutil.copyfile(d / LORA_WEIGHTS, outside)
    (d / LORA_WEIGHTS).unlink()
    (d / LORA_WEIGHTS).symlink_to(outside)


def _nan(d: Path) -> None:
    weights = load_file(d / LORA_WEIGHTS)
    key = next(k for k in weights if "lora_A" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, d / LORA_WEIGHTS)


def _wrong_shapes(d: Path) -> None:
    config = json.loads((d / "adapter_config.json").read_text())
    config["r"] = 2 * config["r"]
    (d / "adapter_config.json").write_text(json.dumps(config))


def _unknown_field(d: Path) -> None:
    config = json.loads((d / "adapter_config.json").read_text())
    config["shiny_new_feature"] = True
    (d / "adapter_config.json").write_text(json.dumps(config))


BAD = [
    (_corrupt, "not a valid safetensors file"),
    (_truncated, "not a valid safetensors file"),
    (_empty, "not a valid safetensors file"),
    (_pickle_only, "adapter_model.bin is a pickle file, which is never loaded"),
    (_link_out_of_store, "outside the adapter's folder"),
    (_nan, "NaN or infinite"),
    (_wrong_shapes, "expected ("),
    (_unknown_field, "shiny_new_feature: unknown setting"),
]


def test_every_bad_adapter_fails_only_its_requests_with_its_reason_and_is_served_once_fixed(
    store_server, offline_engine
):
    server, store, _, _ = store_server
    good = expected(offline_engine, "store test", "alpha", 8)
    other = expected(offline_engine, "store test", "gamma", 8)
    with client_for(server) as client:
        for damage, reason in BAD:
            store.put("bad", "alpha", damage)
            until(
                lambda reason=reason: reason in str(error_of(lambda: ask(client, "bad"))),
                f"refusal {damage.__name__}",
            )
            refused = failure(lambda: ask(client, "bad"))
            assert refused.code == "NOT_FOUND" and "'bad' is not servable" in refused.message, refused
            answer = ask(client, "t-gamma")  # other adapters keep answering exactly
            assert (answer.text, answer.adapter_version) == other
            store.put("bad", "alpha")  # fixed: the same id, good files
            until(lambda: ask(client, "bad"), f"the fixed adapter after {damage.__name__}")
            answer = ask(client, "bad")
            assert (answer.text, answer.adapter_version) == good, damage.__name__


def test_more_adapters_in_use_than_the_device_holds_all_answer_exactly(store_server, offline_engine):
    server, _, _, device_bytes = store_server
    adapters = {"t-alpha": "alpha", "t-beta": "beta", "t-gamma": "gamma", "t-pf": "pfeiffer", "": ""}
    prompts = ["one", "two words", "three little words", "a b c d"]
    wanted = {
        (adapter, prompt): expected(offline_engine, prompt, original, 10)
        for adapter, original in adapters.items()
        for prompt in prompts
    }
    requests = [
        GenerateRequest(prompt, adapter, max_tokens=10, tenant_id="acme" if adapter else "globex")
        for _ in range(3)
        for adapter in adapters
        for prompt in prompts
    ]
    with client_for(server, "grpc") as client:
        before = client.adapters("acme")
        outcomes = client.generate_many(requests, concurrency=8)
        after = client.adapters("acme")
    for request, outcome in zip(requests, outcomes, strict=True):
        assert not isinstance(outcome, RequestFailed), (request, outcome)
        assert (outcome.text, outcome.adapter_version) == wanted[(request.adapter_id, request.text)], request
    assert after["evictions"] > before["evictions"], (before, after)  # the device could not hold them all
    for listing in (before, after):
        assert listing["usage"]["device_bytes"] <= device_bytes
        assert listing["usage"]["host_bytes"] <= device_bytes


def test_the_listing_shows_the_store_with_tiers_and_only_what_the_tenant_may_use(store_server):
    server = store_server[0]
    with client_for(server, "grpc") as client:
        ask(client, "t-beta")
        listing = client.adapters("acme")
        globex = client.adapters("globex")
        assert failure(lambda: client.adapters(None)).code == "INVALID_ARG"
    rows = {row["adapter_id"]: row for row in listing["adapters"]}
    assert set(rows) <= set(ACME) and {"t-alpha", "t-beta", "t-gamma", "t-pf", "swap"} <= set(rows)
    assert rows["t-beta"]["tier"] == "device" and rows["t-beta"]["version"].startswith("sha256:")
    assert (rows["t-beta"]["kind"], rows["t-beta"]["shape"]) == ("lora", "r=8")
    assert rows["t-pf"]["kind"] == "bottleneck"
    assert all(row["nbytes"] > 0 for row in rows.values() if row["tier"] != "refused")
    assert {row["adapter_id"] for row in globex["adapters"]} == {"t-gamma"}
    usage = listing["usage"]
    assert usage["device_bytes"] <= usage["device_budget"] and usage["host_bytes"] <= usage["host_budget"]


def test_traffic_to_other_adapters_stays_exact_while_the_store_changes(store_server, offline_engine):
    """Adds, replacements, deletions and evictions under concurrent traffic: no request lost, no answer from
    the wrong adapter or version (`swap` may answer from either of its versions, never a mix)."""
    server, store, _, _ = store_server
    store.put("swap", "alpha")
    text = "steady"
    steady = {
        a: expected(offline_engine, text, o, 8) for a, o in (("t-gamma", "gamma"), ("t-pf", "pfeiffer"))
    }
    swap_versions = {expected(offline_engine, text, o, 8) for o in ("alpha", "beta")}
    stop = threading.Event()
    answers: list[tuple[str, object]] = []

    def traffic(adapter: str) -> None:
        with client_for(server) as client:
            while not stop.is_set():
                try:
                    answers.append((adapter, ask(client, adapter, text)))
                except RequestFailed as exc:
                    answers.append((adapter, exc))

    threads = [threading.Thread(target=traffic, args=(a,)) for a in ("t-gamma", "t-pf", "swap", "t-gamma")]
    for thread in threads:
        thread.start()
    try:
        with client_for(server) as client:
            for original in ("beta", "alpha", "beta"):
                store.put("swap", original)
                version = expected(offline_engine, text, original, 8)[1]
                until(lambda v=version: ask(client, "swap", text).adapter_version == v, "the new version")
                store.put("hot", original)
                until(lambda: ask(client, "hot"), "the added adapter")
                ask(client, "t-alpha")  # evicts something not in use
                store.delete("hot")
                until(
                    lambda: getattr(error_of(lambda: ask(client, "hot")), "code", None) == "NOT_FOUND",
                    "the deletion",
                )
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert len(answers) > 20, len(answers)
    for adapter, outcome in answers:
        assert not isinstance(outcome, RequestFailed), (adapter, outcome)
        pair = (outcome.text, outcome.adapter_version)
        if adapter == "swap":
            assert pair in swap_versions, outcome
        else:
            assert pair == steady[adapter], (adapter, outcome)
    assert {o.adapter_version for a, o in answers if a == "swap"} == {v for _, v in swap_versions}
