"""A quantized base: the checkpoint's linear layers quantized at load time with bitsandbytes.

`nf4` is QLoRA's 4-bit NormalFloat (double quantization, blocks of 64, computing in the engine's dtype);
`int8` is LLM.int8 (outlier columns kept in 16 bits, threshold 6). The output head and the layers the user
names stay unquantized, and so does a layer whose shape the device's kernel cannot take (logged, and
listed by `QuantizedBase.kept`). Everything is checked before the weights are read, so a bad setting fails
the load with the layer or setting named, never the first request.

The adapter bank wraps the quantized modules as they are (layers.BankedLinear): the base path is the module's
own forward and each row's LoRA delta is computed in float32 and added, as PEFT's bitsandbytes layers do.
Nothing dequantizes the base into a full-precision copy, and nothing merges into 4-bit weights.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from .errors import ConfigError
from .parsing import QUANTIZATIONS

log = logging.getLogger(__name__)

NONE, NF4, INT8 = QUANTIZATIONS
# The dtype LoRA deltas are computed in over a quantized base (PEFT keeps adapters in float32 there).
DELTA_DTYPE = torch.float32
# On CPUs with AVX512-BF16, bitsandbytes repacks NF4 weights on the first inference forward into blocks
# that need out_features % 32 == 0 and in_features % 64 == 0 (other shapes fail inside the forward).
_CPU_PACKED_OUT, _CPU_PACKED_IN = 32, 64


@dataclass(frozen=True)
class QuantizedBase:
    """What was quantized: the method, the compute dtype, and per linear layer whether it was."""

    method: str
    compute_dtype: torch.dtype
    quantized: tuple[str, ...]
    kept: dict[str, str]  # layer name -> why it stays unquantized

    def describe(self) -> str:
        if self.method == NONE:
            return "not quantized"
        try:
            version = metadata.version("bitsandbytes")
        except metadata.PackageNotFoundError:  # importable without its metadata (a source checkout)
            version = "unknown version"
        kept = ", ".join(f"{name} ({why})" for name, why in sorted(self.kept.items())) or "none"
        return (
            f"{self.method} (bitsandbytes {version}, computing in {str(self.compute_dtype).split('.')[-1]}):"
            f" {len(self.quantized)} linear layer(s) quantized; kept unquantized: {kept}"
        )


def version_tag(method: str) -> str:
    """What `adapter_version` carries for a quantized base ('' when not quantized): '+nf4', '+int8'."""
    return "" if method == NONE else f"+{method}"


def check_checkpoint(config: PretrainedConfig) -> None:
    """Refuse a checkpoint that is quantized already (GPTQ, AWQ, bitsandbytes, ...): quantization is applied
    at load, to a bf16 / fp16 / fp32 checkpoint."""
    existing = getattr(config, "quantization_config", None)
    if existing:
        method = (
            existing.get("quant_method")
            if isinstance(existing, dict)
            else getattr(existing, "quant_method", None)
        )
        raise ConfigError(
            "base model",
            [
                f"the checkpoint is already quantized (quant_method={method!r}); serve an unquantized bf16, "
                "fp16 or fp32 checkpoint and set quantization (nf4 or int8) to quantize it at load"
            ],
        )


def _bitsandbytes(method: str, device: torch.device):
    if device.type not in ("cpu", "cuda"):
        raise ConfigError("quantization", [f"{method} runs on cpu or cuda, not on {device.type}"])
    try:
        import bitsandbytes
    except Exception as exc:  # ImportError, or a broken native library
        raise ConfigError(
            "quantization", [f"{method} needs bitsandbytes, which does not import here: {exc}"]
        ) from exc
    return bitsandbytes


def _cpu_packs_nf4(bitsandbytes) -> bool:
    try:
        return bool(bitsandbytes.functional.has_avx512bf16())
    except Exception:  # an older build without the probe: it does not repack either
        return False


def plan(
    config: PretrainedConfig, method: str, device: torch.device, skip: Sequence[str]
) -> tuple[dict[str, str], list[str]]:
    """Which linear layers stay unquantized and why, from the checkpoint's config (on the meta device, no
    weights read); raises ConfigError for a user-named layer the model does not have."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    output = skeleton.get_output_embeddings()
    linears: dict[str, tuple[nn.Module, int, int]] = {}  # name -> (module, in_features, out_features)
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear):
            linears[name] = (module, module.in_features, module.out_features)
        elif isinstance(module, Conv1D):  # GPT-2's transposed linear layers, quantized as Linear
            linears[name] = (module, *module.weight.shape)
    problems = [
        f"quantization_skip names {name!r}, which is not a linear layer of the model"
        for name in skip
        if name not in linears
    ]
    if problems:
        raise ConfigError("quantization", problems)
    kept: dict[str, str] = {}
    packs = method == NF4 and device.type == "cpu" and _cpu_packs_nf4(_bitsandbytes(method, device))
    for name, (module, n_in, n_out) in linears.items():
        if module is output:
            kept[name] = "the output head"
        elif name in skip:
            kept[name] = "named in quantization_skip"
        elif method == NF4 and (n_in * n_out) % 2:
            kept[name] = "an odd number of weights cannot be packed two per byte"
        elif packs and (n_out % _CPU_PACKED_OUT or n_in % _CPU_PACKED_IN):
            kept[name] = (
                f"shape {n_out}x{n_in}: this CPU's NF4 kernel needs out % {_CPU_PACKED_OUT} and in % "
                f"{_CPU_PACKED_IN}"
            )
    return kept, [name for name in linears if name not in kept]


def bitsandbytes_config(method: str, compute_dtype: torch.dtype, kept: Sequence[str]):
    """transformers' BitsAndBytesConfig for `method`, keeping the `kept` layers unquantized."""
    from transformers import BitsAndBytesConfig

    if method == NF4:
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(kept),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0, llm_int8_skip_modules=list(kept))


def load_quantized(
    path, config: PretrainedConfig, method: str, device: torch.device, dtype: torch.dtype, skip: Sequence[str]
) -> tuple[nn.Module, QuantizedBase]:
    """Load the checkpoint at `path` with its linear layers quantized by `method` on `device`."""
    if method not in (NF4, INT8):  # EngineConfig built in code skips from_parameters' check
        raise ConfigError("quantization", [f"quantization must be {NF4} or {INT8} here, got {method!r}"])
    bitsandbytes = _bitsandbytes(method, device)
    kept, quantized = plan(config, method, device, skip)
    for name, why in sorted(kept.items()):
        log.info("quantization %s: %s stays unquantized (%s)", method, name, why)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*bitsandbytes.*")
        model = AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            quantization_config=bitsandbytes_config(method, dtype, list(kept)),
            device_map={"": device},
        )
    quant_types = (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)
    really = [name for name, m in model.named_modules() if isinstance(m, quant_types)]
    if sorted(really) != sorted(quantized):
        missing = sorted(set(quantized) - set(really))[:5]
        raise ConfigError("quantization", [f"{method} did not quantize the layers planned: {missing}"])
    if method == INT8:
        _quiet_int8_casts()
    _check_kernels(model, method, device)
    return model, QuantizedBase(method, dtype, tuple(quantized), kept)


def _check_kernels(model: nn.Module, method: str, device: torch.device) -> None:
    """One forward of one token at load: a kernel the device cannot run (a bitsandbytes build without this
    CUDA's library, a CPU path that rejects a shape) fails the load with the setting named, not the first
    request. On AVX512-BF16 CPUs this is also when bitsandbytes repacks the NF4 weights."""
    model.eval()
    try:
        with torch.inference_mode():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device))
    except Exception as exc:
        raise ConfigError(
            "quantization", [f"{method} cannot run on {device}: {type(exc).__name__}: {exc}"]
        ) from exc


class _DropInt8Casts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_casts() -> None:
    """LLM.int8 casts bf16 inputs to float16 by design, and logs a warning saying so on every layer of every
    forward; drop that one message (once per process)."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8Casts) for f in logger.filters):
        logger.addFilter(_DropInt8Casts())


def is_quantized(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes quantized linear layer (its weight is not a float tensor)."""
    weight = getattr(module, "weight", None)
    return weight is not None and not weight.dtype.is_floating_point


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's linear layers' weights, by storage: 'quantized' (packed weights plus their
    quantization statistics) and 'full' (floating point), as they sit in memory."""
    totals = {"quantized": 0, "full": 0}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(module, nn.Linear):
            continue
        if is_quantized(module):
            state = getattr(weight, "quant_state", None)
            extra = 0
            if state is not None:  # NF4: absmax (itself quantized with double quantization) and code
                extra = sum(t.numel() * t.element_size() for t in _state_tensors(state))
            # int8: per-row scales, on the weight until the first forward moves them to the layer's state.
            scb = getattr(weight, "SCB", None)
            if scb is None:
                scb = getattr(getattr(module, "state", None), "SCB", None)
            if isinstance(scb, torch.Tensor):
                extra += scb.numel() * scb.element_size()
            totals["quantized"] += weight.numel() * weight.element_size() + extra
        else:
            totals["full"] += weight.numel() * weight.element_size()
    return totals


def _state_tensors(state) -> list[torch.Tensor]:
    tensors = [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [t for t in (nested.absmax, nested.code) if isinstance(t, torch.Tensor)]
    return tensors
