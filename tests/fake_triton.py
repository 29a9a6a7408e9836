"""One typed stand-in for `triton_python_backend_utils`, for testing `model.py` files without a server.

It implements only what our models use, with the same names and call shapes as the real module
(python_backend 2.51). The real server tests remain the proof; this covers branches a server cannot
easily reach (a model-wide failure, malformed tensors).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1):
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class Tensor:
    def __init__(self, name: str, array: np.ndarray):
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class InferenceResponseSender:
    """Records what a model sends: ``sent`` holds (response, flags) in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int]] = []
        self.cancelled = False  # a test sets it: the client went away

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if any(f == TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent):
            raise RuntimeError("a response was sent after the final one")
        self.sent.append((response, flags))

    def is_cancelled(self) -> bool:
        return self.cancelled

    @property
    def final(self) -> bool:
        return any(f == TRITONSERVER_RESPONSE_COMPLETE_FINAL for _, f in self.sent)


class InferenceRequest:
    def __init__(self, inputs: list[Tensor], parameters: Mapping[str, Any] | None = None):
        self._inputs = inputs
        self._parameters = json.dumps(dict(parameters or {}))
        self._sender = InferenceResponseSender()

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def parameters(self) -> str:
        return self._parameters

    def is_cancelled(self) -> bool:
        return self._sender.cancelled

    def get_response_sender(self) -> InferenceResponseSender:
        return self._sender


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor] | None = None, error: TritonError | None = None):
        self._outputs, self._error = output_tensors or [], error

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error

    def output(self, name: str) -> np.ndarray:
        return next(t.as_numpy() for t in self._outputs if t.name() == name)


class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    families: dict[str, MetricFamily] = {}

    def __init__(self, name: str, description: str, kind: int):
        self.name, self.description, self.kind = name, description, kind
        self.metrics: list[Metric] = []
        MetricFamily.families[name] = self

    def Metric(  # noqa: N802 (the real API's name)
        self, labels: dict[str, str] | None = None, buckets: list[float] | None = None
    ) -> Metric:
        if (self.kind == MetricFamily.HISTOGRAM) != (buckets is not None):
            raise ValueError("a histogram metric takes buckets, and only a histogram does")
        metric = Metric(labels or {})
        self.metrics.append(metric)
        return metric


class Metric:
    def __init__(self, labels: dict[str, str]):
        self.labels, self.value = labels, 0.0
        self.observed: list[float] = []

    def observe(self, value: float) -> None:
        self.observed.append(value)

    def increment(self, value: float) -> None:
        self.value += value

    def set(self, value: float) -> None:
        self.value = value


def get_input_tensor_by_name(request: InferenceRequest, name: str) -> Tensor | None:
    return next((t for t in request.inputs() if t.name() == name), None)


def using_decoupled_model_transaction_policy(model_config: Mapping[str, Any]) -> bool:
    return bool(model_config.get("model_transaction_policy", {}).get("decoupled", False))


class Logger:
    records: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.records.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.records.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.records.append(("error", message))


def _module() -> types.ModuleType:
    module = types.ModuleType("triton_python_backend_utils")
    for name in ("TritonError", "Tensor", "InferenceRequest", "InferenceResponse", "Logger", "MetricFamily"):
        setattr(module, name, globals()[name])
    module.get_input_tensor_by_name = get_input_tensor_by_name
    module.using_decoupled_model_transaction_policy = using_decoupled_model_transaction_policy
    module.TRITONSERVER_RESPONSE_COMPLETE_FINAL = TRITONSERVER_RESPONSE_COMPLETE_FINAL
    return module


@contextmanager
def installed() -> Iterator[types.ModuleType]:
    """Make `import triton_python_backend_utils` resolve to this fake inside the block."""
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake = _module()
    sys.modules.pop("triton_boundary", None)
    try:
        yield fake
    finally:
        sys.modules.pop("triton_boundary", None)
        if previous is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = previous


def load_model_py(path: Path) -> Any:
    """Import a model.py under a unique name and return its TritonPythonModel class."""
    spec = importlib.util.spec_from_file_location(f"model_{path.parent.parent.name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def initialize_args(config_path: Path, parameters: Mapping[str, str]) -> dict[str, str]:
    """The `args` Triton passes to initialize() on a CPU instance, with parameters overridden."""
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    return {
        "model_config": json.dumps(config),
        "model_instance_kind": "CPU",
        "model_instance_device_id": "0",
        "model_repository": str(config_path.parent),
        "model_version": "1",
        "model_name": config_path.parent.name,
    }


def request(parameters: Mapping[str, Any] | None = None, **inputs: Any) -> InferenceRequest:
    """A request whose tensors are given as numpy arrays (or bytes / str for one-element BYTES inputs)."""
    tensors = []
    for name, value in inputs.items():
        if isinstance(value, str | bytes):
            value = np.array([[value.encode() if isinstance(value, str) else value]], dtype=np.object_)
        tensors.append(Tensor(name, value))
    return InferenceRequest(tensors, parameters)
