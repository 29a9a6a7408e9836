"""What to launch: a validated ServerConfig, and the tritonserver command line and environment it implies."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from server.errors import LaunchError
from server.model_control import ADMIN_HEADER
from server.triton_install import TritonInstall

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BACKEND_SRC = PROJECT_ROOT / "backend_src"
if str(BACKEND_SRC) not in sys.path:
    sys.path.insert(0, str(BACKEND_SRC))

from multiadapter.environment import ENV_PREFIX  # noqa: E402 (torch-free, like the parsers below)
from multiadapter.errors import ConfigError  # noqa: E402
from multiadapter.parsing import adapter_id_list, check_quantization, parse_bytes  # noqa: E402
from multiadapter.tenants import TenantPolicy  # noqa: E402

DEFAULT_MODEL_REPOSITORY = PROJECT_ROOT / "model_repository"
DEFAULT_BUILD_ROOT = PROJECT_ROOT / "build" / "triton"

LOOPBACK = "127.0.0.1"
DEFAULT_EXIT_TIMEOUT_SECS = 10  # long enough for torch stubs to unload (~5 s on 2 cores)

# The Python models read these (the backend stubs inherit tritonserver's environment).
BASE_MODEL_ENV = "MULTIADAPTER_BASE_MODEL"
ADAPTER_DIR_ENV = "MULTIADAPTER_ADAPTER_DIR"
CANARY_TENANT_ENV = "MULTIADAPTER_CANARY_TENANT"


def canary_tenant(admin_token: str) -> str:
    """The tenant id the health canary sends: secret like the token, allowed only the bare base."""
    return f"canary-{admin_token}"


@dataclass(frozen=True)
class ServerConfig:
    """Everything that decides how tritonserver is started. Build it, then call ``validated()``."""

    model_repository: Path
    http_port: int
    grpc_port: int
    metrics_port: int
    base_model: Path | None = None
    adapter_dir: Path | None = None
    # More repositories served beside model_repository (e.g. merged-weight variants from tools.merge).
    extra_repositories: tuple[Path, ...] = ()
    address: str = LOOPBACK
    log_verbose: int = 0
    exit_timeout_secs: int = DEFAULT_EXIT_TIMEOUT_SECS
    extra_args: tuple[str, ...] = ()
    # The adapter cache and tenant routing (model parameters of generate_stream, passed as $MULTIADAPTER_*):
    # None leaves the model's config.pbtxt in force.
    adapter_device_bytes: str | None = None
    adapter_host_bytes: str | None = None
    preload_adapters: str | None = None
    pinned_adapters: str | None = None
    tenant_policy: Path | None = None
    # The base's quantization at load (none, nf4, int8; multiadapter.quantization); None: config.pbtxt's.
    quantization: str | None = None
    # With a token, models are loaded under explicit model control and the model-repository API answers
    # only requests carrying it (header ADMIN_HEADER): the launcher's supervisor reloads models with it.
    admin_token: str | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {"HTTP": self.http_port, "gRPC": self.grpc_port, "metrics": self.metrics_port}

    @property
    def connect_host(self) -> str:
        """Where a local client reaches the server (a wildcard bind address is reached on loopback)."""
        return LOOPBACK if self.address in ("0.0.0.0", "") else self.address

    @property
    def http_url(self) -> str:
        return f"{self.connect_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.connect_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"{self.connect_host}:{self.metrics_port}"

    def engine_settings(self) -> dict[str, str | None]:
        """The engine's parameters this launch overrides (multiadapter.environment.ENV_OVERRIDES)."""
        return {
            "adapter_device_bytes": self.adapter_device_bytes,
            "adapter_host_bytes": self.adapter_host_bytes,
            "preload_adapters": self.preload_adapters,
            "pinned_adapters": self.pinned_adapters,
            "tenant_policy": None if self.tenant_policy is None else str(self.tenant_policy),
            "quantization": self.quantization,
        }

    def validated(self) -> ServerConfig:
        """A copy with absolute paths; LaunchError listing every problem found."""
        config = replace(
            self,
            model_repository=self.model_repository.expanduser().resolve(),
            base_model=_absolute(self.base_model),
            adapter_dir=_absolute(self.adapter_dir),
            tenant_policy=_absolute(self.tenant_policy),
            extra_repositories=tuple(path.expanduser().resolve() for path in self.extra_repositories),
        )
        problems = config._problems()
        if problems:
            raise LaunchError("cannot start the server:\n  - " + "\n  - ".join(problems))
        return config

    def _problems(self) -> list[str]:
        problems = []
        if not self.model_repository.is_dir():
            problems.append(f"model repository {self.model_repository} is not a directory")
        if self.base_model is not None and not (self.base_model / "config.json").is_file():
            problems.append(
                f"base model {self.base_model} has no config.json (expected a Hugging Face model directory)"
            )
        if self.adapter_dir is not None and not self.adapter_dir.is_dir():
            problems.append(f"adapter directory {self.adapter_dir} does not exist")
        for repository in self.extra_repositories:
            if not repository.is_dir():
                problems.append(f"model repository {repository} is not a directory")
        for name, port in self.ports.items():
            if not 0 < port < 65536:
                problems.append(f"{name} port {port} is outside 1-65535")
        if len(set(self.ports.values())) != len(self.ports):
            problems.append(f"HTTP, gRPC and metrics ports must differ, got {self.ports}")
        if self.exit_timeout_secs < 0:
            problems.append(f"exit timeout {self.exit_timeout_secs} s is negative")
        for name, size in (("device", self.adapter_device_bytes), ("host", self.adapter_host_bytes)):
            if size is not None:
                try:
                    if parse_bytes(size) < 1:
                        problems.append(f"the adapter {name} budget must be at least 1 byte")
                except ValueError as exc:
                    problems.append(f"adapter {name} budget: {exc}")
        for name, ids in (("preload", self.preload_adapters), ("pin", self.pinned_adapters)):
            if ids is not None and not (name == "preload" and ids.strip() == "*"):
                try:
                    adapter_id_list(ids)
                except ValueError as exc:
                    problems.append(f"--{name}: {exc}")
        if self.quantization is not None:
            problems += [f"--quantize: {p}" for p in check_quantization(self.quantization)]
        if self.tenant_policy is not None:
            try:
                TenantPolicy.read(self.tenant_policy)
            except ConfigError as exc:
                problems.append(str(exc))
        if self.admin_token is not None and not self.admin_token.isalnum():
            problems.append("the admin token must be letters and digits")
        return problems


def tritonserver_command(install: TritonInstall, backends_dir: Path, config: ServerConfig) -> list[str]:
    """The tritonserver argv; ``config.extra_args`` come last so they can override our choices."""
    return [
        str(install.binary),
        f"--model-repository={config.model_repository}",
        *(f"--model-repository={repository}" for repository in config.extra_repositories),
        f"--backend-directory={backends_dir}",
        f"--http-address={config.address}",
        f"--http-port={config.http_port}",
        f"--grpc-address={config.address}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-address={config.address}",
        f"--metrics-port={config.metrics_port}",
        f"--exit-timeout-secs={config.exit_timeout_secs}",
        f"--log-verbose={config.log_verbose}",
        *(_model_control_args(config.admin_token) if config.admin_token else []),
        *config.extra_args,
    ]


# APIs only the launcher (model control) or nobody may use: clients get "restricted" without the admin header.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")


def _model_control_args(token: str) -> list[str]:
    restricted = f"{','.join(RESTRICTED_APIS)}:{ADMIN_HEADER}={token}"
    return [
        "--model-control-mode=explicit",
        "--load-model=*",
        f"--http-restricted-api={restricted}",
        f"--grpc-restricted-protocol={restricted}",
    ]


def tritonserver_env(
    install: TritonInstall,
    config: ServerConfig,
    base_env: Mapping[str, str] | None = None,
    python_bin_dir: Path | None = None,
) -> dict[str, str]:
    """tritonserver's environment: ``base_env`` (default os.environ) with our additions.

    PATH starts with the directory of the running interpreter (unresolved, so a virtualenv's ``bin``):
    the backend stub finds its packages through the ``python3`` first on PATH. The MULTIADAPTER_* variables
    are set from the config, or removed so a stale value from the caller's shell cannot leak in.
    """
    env = dict(os.environ if base_env is None else base_env)
    bin_dir = python_bin_dir or Path(sys.executable).parent
    env["PATH"] = _prepend(str(bin_dir), env.get("PATH"))
    if install.libs_dir is not None:
        env["LD_LIBRARY_PATH"] = _prepend(str(install.libs_dir), env.get("LD_LIBRARY_PATH"))
    for name, path in ((BASE_MODEL_ENV, config.base_model), (ADAPTER_DIR_ENV, config.adapter_dir)):
        if path is None:
            env.pop(name, None)
        else:
            env[name] = str(path)
    for key, value in config.engine_settings().items():
        if value is None:
            env.pop(ENV_PREFIX + key.upper(), None)
        else:
            env[ENV_PREFIX + key.upper()] = value
    if config.admin_token:
        env[CANARY_TENANT_ENV] = canary_tenant(config.admin_token)
    else:
        env.pop(CANARY_TENANT_ENV, None)
    return env


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().resolve()


def _prepend(entry: str, search_path: str | None) -> str:
    return entry if not search_path else f"{entry}{os.pathsep}{search_path}"
