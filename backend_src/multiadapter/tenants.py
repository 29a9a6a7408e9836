"""Tenant routing: which adapters each tenant may use, and which one serves a request that names none.

The policy is a JSON file (`--tenants`, `$MULTIADAPTER_TENANTS`)::

    {"tenants": {"acme": {"default": "acme-support-v3", "allow": ["acme-support-v3", "acme-sql"]}}}

With a policy every request carries a `tenant_id`. An empty `adapter_id` is served by the tenant's
`default` ("" there means the bare base); an adapter outside the tenant's `allow` list fails exactly as an
adapter that does not exist (`AdapterNotFound`), so no tenant can probe another's adapters. The file is
re-read when it changes (checked at most every `check_interval_s`); a changed file that does not validate
is logged and the last good policy stays in force. No torch here: the launcher validates the file too.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .adapter_ids import ADAPTER_ID_PATTERN, check_adapter_id
from .errors import AdapterNotFound, ConfigError, InvalidRequest

log = logging.getLogger(__name__)

TENANT_ID_PATTERN = ADAPTER_ID_PATTERN  # names: letters, digits, '.', '_', '-'; at most 128
MAX_POLICY_BYTES = 16 << 20


class TenantRefused(InvalidRequest):
    """A request without a tenant, or from a tenant the policy does not know."""


@dataclass(frozen=True)
class Tenant:
    default: str
    allow: frozenset[str]


@dataclass(frozen=True)
class TenantPolicy:
    """Tenants by id. Build with `parse` (validates everything, reports every problem)."""

    tenants: Mapping[str, Tenant]

    @classmethod
    def parse(cls, data: object, where: str = "tenant policy") -> TenantPolicy:
        """From the decoded JSON document. Raises ConfigError listing every problem."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError(where, ['expected an object {"tenants": {...}}'])
        problems += [f"unknown field {key!r} (expected 'tenants')" for key in data if key != "tenants"]
        entries = data.get("tenants")
        if not isinstance(entries, dict):
            raise ConfigError(where, [*problems, "'tenants' must be an object of tenant id -> rules"])
        tenants: dict[str, Tenant] = {}
        for tenant_id, rules in entries.items():
            name = f"tenant {tenant_id!r}"
            if not TENANT_ID_PATTERN.fullmatch(tenant_id):
                problems.append(f"{name}: a tenant id is letters, digits, '.', '_' or '-' (at most 128)")
                continue
            if not isinstance(rules, dict):
                problems.append(f'{name}: expected {{"default": ..., "allow": [...]}}')
                continue
            problems += [f"{name}: unknown field {k!r}" for k in rules if k not in ("default", "allow")]
            allow = rules.get("allow", [])
            default = rules.get("default", "")
            if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
                problems.append(f"{name}: 'allow' must be a list of adapter ids")
                continue
            if not isinstance(default, str):
                problems.append(f"{name}: 'default' must be an adapter id ('' for the base)")
                continue
            bad = [a for a in [*allow, default] if a and not _valid_adapter_id(a)]
            problems += [f"{name}: {a!r} is not a valid adapter id" for a in bad]
            if default and default not in allow:
                problems.append(f"{name}: its default {default!r} is not in its 'allow' list")
            tenants[tenant_id] = Tenant(default, frozenset(allow))
        if problems:
            raise ConfigError(where, problems)
        return cls(tenants)

    @classmethod
    def read(cls, path: Path) -> TenantPolicy:
        """Read and validate the policy file. Raises ConfigError."""
        where = f"tenant policy {path}"
        try:
            if path.stat().st_size > MAX_POLICY_BYTES:
                raise ConfigError(where, [f"larger than {MAX_POLICY_BYTES >> 20} MiB"])
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(where, [f"cannot be read: {exc.strerror or exc}"]) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(where, [f"is not valid JSON: {exc}"]) from None
        return cls.parse(data, where)

    def route(self, tenant_id: str | None, adapter_id: str) -> str:
        """The adapter that serves `adapter_id` for `tenant_id` ('' asks for the tenant's default).
        Raises TenantRefused (no or unknown tenant) or AdapterNotFound (not allowed: the same error as an
        adapter that does not exist)."""
        if not tenant_id:
            raise TenantRefused("this server routes by tenant: the request needs a tenant_id")
        tenant = self.tenants.get(tenant_id)
        if tenant is None:
            shown = tenant_id if len(tenant_id) <= 64 else tenant_id[:64] + "..."
            raise TenantRefused(f"tenant {shown!r} is not known to this server")
        if not adapter_id:
            return tenant.default
        if adapter_id not in tenant.allow:
            raise AdapterNotFound(adapter_id)
        return adapter_id

    def allowed(self, tenant_id: str | None) -> frozenset[str]:
        """What `tenant_id` may use. Raises TenantRefused like `route`."""
        self.route(tenant_id, "")
        tenant = self.tenants[tenant_id]  # type: ignore[index]
        return tenant.allow | {tenant.default}


def _valid_adapter_id(adapter_id: str) -> bool:
    try:
        check_adapter_id(adapter_id)
    except InvalidRequest:
        return False
    return True


class TenantPolicyFile:
    """The policy in `path`, re-read when the file changes (stat checked at most every
    `check_interval_s`). Reading it at construction raises ConfigError; later bad versions are logged and
    the last good policy stays in force until the file is fixed."""

    def __init__(
        self, path: Path, check_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = path
        self._interval = check_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._policy = TenantPolicy.read(path)
        self._checked = clock()
        self.reloads = 0
        self.last_error: str | None = None

    def _stat(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def current(self) -> TenantPolicy:
        """The policy in force, re-read first if the file changed since the last check."""
        now = self._clock()
        with self._lock:
            if now - self._checked < self._interval:
                return self._policy
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp:
                return self._policy
            self._stamp = stamp
            try:
                self._policy = TenantPolicy.read(self.path)
            except ConfigError as exc:
                if str(exc) != self.last_error:
                    log.error("keeping the previous tenant policy: %s", exc)
                self.last_error = str(exc)
                return self._policy
            self.reloads += 1
            self.last_error = None
            log.info("tenant policy %s re-read: %d tenant(s)", self.path, len(self._policy.tenants))
            return self._policy

    def route(self, tenant_id: str | None, adapter_id: str) -> str:
        return self.current().route(tenant_id, adapter_id)
