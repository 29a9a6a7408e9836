"""Tenant routing (multiadapter.tenants): the policy's rules, its validation, and re-reading the file.

The server-level behaviour (over HTTP and gRPC, with the identical error for forbidden and unknown adapters)
is tested in test_adapter_store_server.py; these are the rules themselves, table by table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from multiadapter.errors import AdapterNotFound, ConfigError, InvalidRequest
from multiadapter.tenants import TenantPolicy, TenantPolicyFile, TenantRefused

POLICY = {
    "tenants": {
        "acme": {"default": "acme-support-v3", "allow": ["acme-support-v3", "acme-sql"]},
        "globex": {"default": "", "allow": ["globex-chat"]},
    }
}


@pytest.fixture
def policy() -> TenantPolicy:
    return TenantPolicy.parse(POLICY)


@pytest.mark.parametrize(
    ("tenant", "adapter", "served"),
    [
        ("acme", "", "acme-support-v3"),  # the tenant's default
        ("acme", "acme-sql", "acme-sql"),
        ("acme", "acme-support-v3", "acme-support-v3"),
        ("globex", "", ""),  # a default of "" is the bare base
        ("globex", "globex-chat", "globex-chat"),
    ],
)
def test_a_tenant_is_served_its_default_or_an_allowed_adapter(policy, tenant, adapter, served):
    assert policy.route(tenant, adapter) == served


@pytest.mark.parametrize(
    ("tenant", "adapter"),
    [("acme", "globex-chat"), ("globex", "acme-sql"), ("acme", "nope"), ("globex", "acme-support-v3")],
)
def test_an_adapter_outside_the_allow_list_fails_exactly_as_one_that_does_not_exist(policy, tenant, adapter):
    with pytest.raises(AdapterNotFound) as forbidden:
        policy.route(tenant, adapter)
    unknown = AdapterNotFound(adapter)  # what the engine raises for an adapter the store does not have
    assert (type(forbidden.value), str(forbidden.value)) == (type(unknown), str(unknown))


@pytest.mark.parametrize("tenant", [None, "", "initech", "ACME"])
def test_a_missing_or_unknown_tenant_is_refused(policy, tenant):
    with pytest.raises(TenantRefused, match="tenant") as refused:
        policy.route(tenant, "acme-sql")
    assert isinstance(refused.value, InvalidRequest)


def test_allowed_lists_what_a_tenant_may_use(policy):
    assert policy.allowed("acme") == {"acme-support-v3", "acme-sql"}
    assert policy.allowed("globex") == {"", "globex-chat"}
    with pytest.raises(TenantRefused):
        policy.allowed("initech")


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([], "expected an object"),
        ({"tenant": {}}, "unknown field 'tenant'"),
        ({"tenants": []}, "'tenants' must be an object"),
        ({"tenants": {"a/b": {"allow": []}}}, "a tenant id is letters"),
        ({"tenants": {"a": {"allow": "x"}}}, "'allow' must be a list"),
        ({"tenants": {"a": {"allow": ["../x"]}}}, "'../x' is not a valid adapter id"),
        ({"tenants": {"a": {"default": "x", "allow": []}}}, "its default 'x' is not in its 'allow' list"),
        ({"tenants": {"a": {"default": 3, "allow": []}}}, "'default' must be an adapter id"),
        ({"tenants": {"a": {"allow": [], "deny": []}}}, "unknown field 'deny'"),
        ({"tenants": {"a": "x"}}, "expected"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_problem(document, problem):
    with pytest.raises(ConfigError, match=problem):
        TenantPolicy.parse(document)


def test_every_problem_is_reported_at_once():
    document = {"tenants": {"a": {"allow": ["../x"]}, "b": {"default": "y", "allow": []}}, "extra": 1}
    with pytest.raises(ConfigError) as error:
        TenantPolicy.parse(document)
    assert len(error.value.problems) == 3, error.value.problems


def test_a_file_that_is_not_json_or_missing_is_refused(tmp_path: Path):
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TenantPolicy.read(tmp_path / "bad.json")
    with pytest.raises(ConfigError, match="cannot be read"):
        TenantPolicy.read(tmp_path / "missing.json")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, document: object) -> None:
    """Write like an operator's tool: a new file renamed over the old one (a new inode)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    os.replace(tmp, path)


def test_the_policy_file_is_re_read_when_it_changes_and_a_bad_version_keeps_the_last_good(tmp_path: Path):
    path = tmp_path / "tenants.json"
    write(path, POLICY)
    clock = Clock()
    live = TenantPolicyFile(path, check_interval_s=1.0, clock=clock)
    assert live.route("acme", "") == "acme-support-v3"

    changed = {"tenants": {"acme": {"default": "acme-sql", "allow": ["acme-sql"]}}}
    write(path, changed)
    clock.now = 0.5  # within the check interval: not looked at yet
    assert live.route("acme", "") == "acme-support-v3"
    clock.now = 1.5
    assert live.route("acme", "") == "acme-sql"
    with pytest.raises(TenantRefused):
        live.route("globex", "")  # removed with the new version
    assert live.reloads == 1

    write(path, {"tenants": {"acme": {"default": "gone", "allow": []}}})  # invalid: default not allowed
    clock.now = 3.0
    assert live.route("acme", "") == "acme-sql"  # the last good policy stays in force
    assert live.last_error is not None and "not in its 'allow' list" in live.last_error

    path.unlink()
    clock.now = 4.5
    assert live.route("acme", "") == "acme-sql"

    write(path, POLICY)  # fixed
    clock.now = 6.0
    assert live.route("acme", "") == "acme-support-v3" and live.last_error is None
    assert live.reloads == 2


def test_the_engine_routes_by_tenant_and_serves_the_launchers_canary_only_the_base(
    tiny_model, tmp_path: Path
):
    """In-process: the engine applies the policy before its cache; the canary tenant (a secret the launcher
    passes to the models and to its health checks) gets the bare base and nothing else."""
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine, GenerationRequest

    first, second = tiny_model.adapter_ids[:2]
    path = tmp_path / "tenants.json"
    write(path, {"tenants": {"acme": {"default": first, "allow": [first]}}})
    config = EngineConfig(
        base_model=tiny_model.base_model,
        adapter_dir=tiny_model.adapter_dir,
        tenant_policy=path,
        canary_tenant="canary-secret",
    )
    engine = Engine.load(config)

    def one(adapter: str, tenant: str | None):
        (outcome,) = engine.generate([GenerationRequest([5, 6, 7], adapter, max_tokens=3, tenant_id=tenant)])
        return outcome

    assert one("", "acme").adapter_id == first
    assert isinstance(one(second, "acme"), AdapterNotFound)
    assert str(one(second, "acme")) == str(one("no-such", "acme")).replace("no-such", second)
    assert one("", "canary-secret").adapter_id == ""
    assert isinstance(one(first, "canary-secret"), TenantRefused)  # the canary may not use adapters
    assert isinstance(one("", None), TenantRefused)
    listing = engine.listing("acme")
    assert [row["adapter_id"] for row in listing["adapters"]] == [first]
