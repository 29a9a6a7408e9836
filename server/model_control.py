"""Triton's model-repository API, as the launcher uses it to heal a model: read its configuration, load it
again, or load a stand-in in its place. Also the few ``/metrics`` samples the supervisor watches.

The launcher starts tritonserver with ``--model-control-mode=explicit --load-model=*`` and restricts the
model-repository API to requests carrying a header with a token only the launcher knows (``ADMIN_HEADER``),
so clients can infer but cannot load or unload models.
"""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

ADMIN_HEADER = "multiadapter-admin-token"


class ModelControlError(RuntimeError):
    """The server refused or failed a model-repository request; the message is the server's."""


@dataclass(frozen=True)
class ModelProgress:
    """One scrape of a model's queue and work: requests waiting or in its engine, and executions or engine
    steps done."""

    pending: float = 0.0
    executions: float = 0.0
    answers_later: bool = False  # it runs an engine loop that answers requests after execute returned


class ModelControl:
    """Model-repository and metrics calls against one tritonserver (HTTP, loopback)."""

    def __init__(self, http_url: str, metrics_url: str, admin_token: str, timeout_s: float = 300.0):
        self.http_url = http_url
        self.metrics_url = metrics_url
        self._headers = {ADMIN_HEADER: admin_token}
        self.timeout_s = timeout_s
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, method: str, path: str, body: Any = None, timeout_s: float | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://{self.http_url}{path}",
            data=data,
            method=method,
            headers={**self._headers, **({"Content-Type": "application/json"} if data else {})},
        )
        try:
            with self._opener.open(request, timeout=timeout_s or self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            with contextlib.suppress(ValueError, AttributeError):
                detail = json.loads(detail).get("error", detail)
            raise ModelControlError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ModelControlError(f"{method} {path}: {exc}") from None
        return json.loads(text) if text else None

    def index(self) -> list[dict[str, str]]:
        """Every model of the repositories with its state (READY, UNAVAILABLE, LOADING, UNLOADING)."""
        return self._call("POST", "/v2/repository/index", {})

    def is_ready(self, model: str) -> bool:
        """Whether ``model`` is loaded and ready (False on any error)."""
        try:
            self._call("GET", f"/v2/models/{model}/ready", timeout_s=10)
        except ModelControlError:
            return False
        return True

    def config(self, model: str) -> dict[str, Any]:
        """The configuration Triton serves ``model`` with (auto-completed fields included)."""
        return self._call("GET", f"/v2/models/{model}/config")

    def load(
        self,
        model: str,
        config: Mapping[str, Any] | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> None:
        """Load ``model``, or load it again if loaded (the old version serves until the new one is ready).

        With ``config`` and ``files`` (paths inside the model directory, e.g. ``1/model.py``), Triton loads
        the model from those instead of its repository; a later plain load returns to the repository.
        """
        parameters: dict[str, str] = {}
        if config is not None:
            parameters["config"] = json.dumps(config)
        for path, content in (files or {}).items():
            parameters[f"file:{path}"] = base64.b64encode(content).decode()
        body = {"parameters": parameters} if parameters else {}
        self._call("POST", f"/v2/repository/models/{model}/load", body)

    def progress(self) -> dict[str, ModelProgress]:
        """Per model: ``nv_inference_pending_request_count`` and ``nv_inference_exec_count``, summed over
        versions."""
        opener = self._opener
        try:
            with opener.open(f"http://{self.metrics_url}/metrics", timeout=10) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError) as exc:
            raise ModelControlError(f"GET /metrics: {exc}") from None
        return parse_progress(text)


# Work that waits, and work done, per model: Triton's own queue and executions, plus the engine loop's
# requests and steps (a model that answers later returns from execute at once, so Triton's counts alone
# would not show its engine stalling).
ENGINE_SERIES = "multiadapter_engine_requests"
PENDING_SERIES = ("nv_inference_pending_request_count", ENGINE_SERIES)
PROGRESS_SERIES = ("nv_inference_exec_count", "multiadapter_engine_steps")


def parse_progress(text: str) -> dict[str, ModelProgress]:
    """``ModelProgress`` per model from Prometheus text exposition."""
    pending: dict[str, float] = {}
    executions: dict[str, float] = {}
    wanted = {
        **{name: pending for name in PENDING_SERIES},
        **{name: executions for name in PROGRESS_SERIES},
    }
    engines: set[str] = set()
    for family in text_string_to_metric_families(text):
        target = wanted.get(family.name)
        if target is None:
            continue
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is not None:
                target[model] = target.get(model, 0.0) + sample.value
                if family.name == ENGINE_SERIES:
                    engines.add(model)
    return {
        model: ModelProgress(pending.get(model, 0.0), executions.get(model, 0.0), model in engines)
        for model in pending.keys() | executions.keys()
    }
