"""Typed engine configuration, parsed once from string parameters (Triton config / environment)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapter_manager import CacheBudgets
from .adapter_metrics import DEFAULT_MAX_SERIES
from .environment import ENV_ADAPTER_DIR, ENV_BASE_MODEL, ENV_CANARY_TENANT, ENV_OVERRIDES, ENV_PREFIX
from .errors import ConfigError
from .lora_loading import DEFAULT_MAX_ADAPTER_BYTES
from .merged_variant import MERGED_INFO_FILE
from .parsing import adapter_id_list, check_quantization, parse_bytes
from .sampling import SamplingLimits
from .tenants import TenantPolicy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BATCHING = ("continuous", "request")


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs to start. `dtype` 'auto' is float32 on CPU and bfloat16 on GPU.

    `merged` marks a merged-weight variant: `base_model` is a directory written by the merge tool (one LoRA
    adapter folded into the weights, see merged_variant.py) and there is no adapter bank.
    """

    base_model: Path
    adapter_dir: Path | None = None
    merged: bool = False
    dtype: str = "auto"
    # The base's linear layers quantized at load (quantization.py): none, nf4 or int8; layers kept unquantized
    # besides the output head.
    quantization: str = "none"
    quantization_skip: tuple[str, ...] = ()
    # The dtype LoRA weights are kept and their deltas computed in: "auto" is float32 over a quantized base
    # (as PEFT keeps them) and the model's dtype otherwise; bfloat16 / float16 over a quantized base halve
    # each adapter's bytes, at bf16 rounding of the delta.
    lora_dtype: str = "auto"
    max_adapters: int = 64
    limits: SamplingLimits = SamplingLimits()
    num_threads: int = 0
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES
    # Continuous batching (scheduler.py): rows in flight, their KV-token reservations (0: max_batch_rows
    # times the context window, so any one request fits), prompt positions prefilled per step. "request"
    # batching generates each submitted group to its end instead (kept to measure against).
    batching: str = "continuous"
    max_batch_rows: int = 16
    max_kv_tokens: int = 0
    prefill_chunk: int = 512
    # Requests the loop holds before it refuses more (UNAVAILABLE at once), and how long one may wait for
    # admission before it fails UNAVAILABLE (0: no limit). Triton's own queue no longer bounds them.
    max_waiting_requests: int = 128
    queue_timeout_ms: int = 10_000
    # The adapter cache (adapter_manager.py): bytes of adapter tensors on the device and in host memory,
    # adapters loaded at start ("*": every adapter of the store, in name order, while they fit) and
    # adapters never evicted.
    adapter_device_bytes: int = CacheBudgets.device_bytes
    adapter_host_bytes: int = CacheBudgets.host_bytes
    preload_adapters: tuple[str, ...] = ("*",)
    pinned_adapters: tuple[str, ...] = ()
    # Tenant routing (tenants.py): a JSON policy file, re-read when it changes; None serves without tenants.
    tenant_policy: Path | None = None
    # The health canary's tenant ($MULTIADAPTER_CANARY_TENANT): served the bare base under a policy.
    canary_tenant: str | None = None
    # Adapters with metric series of their own (adapter_metrics.py); the rest are counted as "other".
    metrics_adapter_series: int = DEFAULT_MAX_SERIES

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], env: Mapping[str, str] | None = None) -> EngineConfig:
        """Build from string parameters; `env` (default os.environ) overrides the two paths.

        Keys: base_model, adapter_dir, merged_model, dtype, quantization (none, nf4, int8),
        quantization_skip (layer names), lora_dtype, max_adapters, default_max_tokens,
        max_tokens_cap, num_threads, max_adapter_bytes, batching, max_batch_rows, max_kv_tokens,
        prefill_chunk, max_waiting_requests, queue_timeout_ms, metrics_adapter_series, adapter_device_bytes,
        adapter_host_bytes
        (sizes: 512MiB, 2GiB, or bytes), preload_adapters ("*", or ids separated by commas; "" for none),
        pinned_adapters (ids), tenant_policy (a JSON file, tenants.py); $MULTIADAPTER_<KEY> overrides these
        last five when set. `merged_model` (a
        merged-weight variant) takes the place of base_model and adapter_dir, and the environment does not
        override it. Unknown keys and bad values are all reported together.
        """
        env = os.environ if env is None else env
        known = {
            "base_model",
            "adapter_dir",
            "dtype",
            "quantization",
            "quantization_skip",
            "lora_dtype",
            "max_adapters",
            "default_max_tokens",
            "max_tokens_cap",
            "num_threads",
            "max_adapter_bytes",
            "merged_model",
            "batching",
            "max_batch_rows",
            "max_kv_tokens",
            "prefill_chunk",
            "max_waiting_requests",
            "queue_timeout_ms",
            "metrics_adapter_series",
            *ENV_OVERRIDES,
        }
        problems = [f"unknown parameter {k!r}" for k in params if k not in known]
        own_quantization = params.get("quantization", "")
        params = {**params}
        for key in ENV_OVERRIDES:
            if ENV_PREFIX + key.upper() in env:  # set by the launcher, even to "" (preload none)
                params[key] = env[ENV_PREFIX + key.upper()]
        merged = params.get("merged_model", "")
        if merged:
            # The server-wide $MULTIADAPTER_* paths belong to the bank model, not to a merged variant.
            if params.get("base_model") or params.get("adapter_dir"):
                problems.append("merged_model excludes base_model and adapter_dir")
            base, adapters = merged, ""
            if not (Path(merged) / MERGED_INFO_FILE).is_file():
                problems.append(
                    f"merged_model {merged!r} has no {MERGED_INFO_FILE}: build it with tools.merge"
                )
        else:
            base = env.get(ENV_BASE_MODEL) or params.get("base_model", "")
            adapters = env.get(ENV_ADAPTER_DIR) or params.get("adapter_dir", "")
        if not base:
            problems.append(f"base_model is not set (parameter base_model or ${ENV_BASE_MODEL})")
        elif not (Path(base) / "config.json").is_file():
            problems.append(f"base_model {base!r} is not a Hugging Face model directory (no config.json)")
        if adapters and not Path(adapters).is_dir():
            problems.append(f"adapter_dir {adapters!r} is not a directory")
        dtype = params.get("dtype", "auto") or "auto"
        if dtype != "auto" and dtype not in DTYPES:
            problems.append(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
        # The launcher's --quantize is the bank's; a merged variant reads only its own parameter.
        quantization = (own_quantization if merged else params.get("quantization", "")) or "none"
        problems += check_quantization(quantization)
        if merged and quantization != "none":
            problems.append(
                "a merged-weight variant is not quantized: merging into 4-bit weights is lossy, and merging"
                " into their dequantized copy would hold a full-precision model; serve adapters over a"
                " quantized base through the bank"
            )
        lora_dtype = params.get("lora_dtype", "auto") or "auto"
        if lora_dtype != "auto" and lora_dtype not in DTYPES:
            problems.append(f"lora_dtype must be auto or one of {sorted(DTYPES)}, got {lora_dtype!r}")
        skip = tuple(name.strip() for name in params.get("quantization_skip", "").split(",") if name.strip())
        batching = params.get("batching", "continuous") or "continuous"
        if batching not in BATCHING:
            problems.append(f"batching must be one of {list(BATCHING)}, got {batching!r}")

        def integer(key: str, default: int, minimum: int) -> int:
            raw = params.get(key, "")
            if raw == "":
                return default
            try:
                value = int(raw)
            except ValueError:
                problems.append(f"{key} must be an integer, got {raw!r}")
                return default
            if value < minimum:
                problems.append(f"{key} must be >= {minimum}, got {value}")
            return value

        def size(key: str, default: int) -> int:
            raw = params.get(key, "")
            if raw == "":
                return default
            try:
                value = parse_bytes(raw)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                return default
            if value < 1:
                problems.append(f"{key} must be at least 1 byte, got {raw!r}")
            return value

        def ids(key: str, default: tuple[str, ...]) -> tuple[str, ...]:
            raw = params.get(key)
            if raw is None:
                return default
            if raw.strip() == "*":
                return ("*",)
            try:
                return adapter_id_list(raw)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                return default

        defaults = SamplingLimits()
        limits = SamplingLimits(
            default_max_tokens=integer("default_max_tokens", defaults.default_max_tokens, 1),
            max_tokens_cap=integer("max_tokens_cap", defaults.max_tokens_cap, 1),
        )
        if limits.default_max_tokens > limits.max_tokens_cap:
            problems.append("default_max_tokens must not exceed max_tokens_cap")
        config = cls(
            base_model=Path(base),
            adapter_dir=Path(adapters) if adapters else None,
            merged=bool(merged),
            dtype=dtype,
            quantization=quantization,
            quantization_skip=skip,
            lora_dtype=lora_dtype,
            max_adapters=integer("max_adapters", 64, 1),
            limits=limits,
            num_threads=integer("num_threads", 0, 0),
            max_adapter_bytes=integer("max_adapter_bytes", DEFAULT_MAX_ADAPTER_BYTES, 1),
            batching=batching,
            max_batch_rows=integer("max_batch_rows", 16, 1),
            max_kv_tokens=integer("max_kv_tokens", 0, 0),
            prefill_chunk=integer("prefill_chunk", 512, 1),
            max_waiting_requests=integer("max_waiting_requests", 128, 1),
            queue_timeout_ms=integer("queue_timeout_ms", 10_000, 0),
            adapter_device_bytes=size("adapter_device_bytes", CacheBudgets.device_bytes),
            adapter_host_bytes=size("adapter_host_bytes", CacheBudgets.host_bytes),
            preload_adapters=ids("preload_adapters", ("*",)),
            pinned_adapters=ids("pinned_adapters", ()),
            tenant_policy=Path(params["tenant_policy"]) if params.get("tenant_policy") else None,
            canary_tenant=env.get(ENV_CANARY_TENANT) or None,
            metrics_adapter_series=integer("metrics_adapter_series", DEFAULT_MAX_SERIES, 0),
        )
        if config.tenant_policy is not None:
            try:
                TenantPolicy.read(config.tenant_policy)
            except ConfigError as exc:
                problems.append(str(exc))
        if config.pinned_adapters == ("*",):
            problems.append("pinned_adapters takes adapter ids, not '*'")
        if problems:
            raise ConfigError("multi-adapter model configuration", problems)
        return config

    def cache_budgets(self) -> CacheBudgets:
        return CacheBudgets(
            device_bytes=self.adapter_device_bytes,
            host_bytes=self.adapter_host_bytes,
            pinned=frozenset(self.pinned_adapters),
        )

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype of the model's unquantized parameters and activations ('auto': bfloat16 on CUDA and
        under a quantized base, where it is also the 4-bit layers' compute dtype; float32 otherwise)."""
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" or self.quantization != "none" else torch.float32
        return DTYPES[self.dtype]
