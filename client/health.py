"""Truthful health: one canary inference per served `generate`-contract model.

Triton 2.51 keeps answering 200 on `/v2/health/ready` while a model's Python stub is dead and every request
to it fails, so readiness alone lies. A canary is a real request through the whole model: a short prompt on
the bare base (adapter_id ""), greedy, one new token. Every model that takes the `generate` contract is
checked: `generate` (which runs through the engine of `generate_stream`) and each `generate_merged_<id>`,
found from the server's own model list.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from client.api import AdapterClient, GenerateRequest, RequestFailed

CANARY_PROMPT = "canary"
# The inputs and output that make a model answer the `generate` contract.
CONTRACT_INPUTS = frozenset({"text_input", "adapter_id"})
CONTRACT_OUTPUT = "text_output"


@dataclass(frozen=True)
class CanaryResult:
    """One model's canary: ok, or the Triton-style error code and message that failed it."""

    model: str
    ok: bool
    latency_s: float
    code: str = ""
    message: str = ""

    @property
    def busy(self) -> bool:
        """Refused for capacity (a full queue, a model being restarted): the model answered, quickly."""
        return self.code == "UNAVAILABLE"


def canary_request(tenant_id: str | None = None) -> GenerateRequest:
    """The canary; ``tenant_id`` is the launcher's canary tenant, which a server with a tenant policy serves
    the bare base (see multiadapter.environment)."""
    return GenerateRequest(CANARY_PROMPT, "", max_tokens=1, temperature=0.0, tenant_id=tenant_id)


def run_canary(client: AdapterClient, model: str, tenant_id: str | None = None) -> CanaryResult:
    """Send the canary to ``model`` through ``client``'s server; never raises for a failed request."""
    start = time.perf_counter()
    try:
        result = client.generate_on_model(model, canary_request(tenant_id))
    except RequestFailed as failure:
        return CanaryResult(model, False, time.perf_counter() - start, failure.code, failure.message)
    if result.generated_tokens < 1:
        return CanaryResult(
            model, False, result.latency_s, "INTERNAL", "the answer reports no generated token"
        )
    return CanaryResult(model, True, result.latency_s)


def generate_models(client: AdapterClient) -> list[str]:
    """Names of the loaded models that take the `generate` contract, sorted. Decoupled ones
    (`generate_stream`) are left out: they answer no plain infer, and `generate`'s canary runs through
    the engine `generate_stream` hosts."""
    names = []
    for name, (inputs, outputs) in client.model_signatures().items():
        if inputs >= CONTRACT_INPUTS and CONTRACT_OUTPUT in outputs:
            try:
                decoupled = client.is_decoupled(name)
            except RequestFailed:  # being unloaded meanwhile: not served
                continue
            if not decoupled:
                names.append(name)
    return sorted(names)


def check(
    url: str | None = None,
    protocol: str = "http",
    models: Sequence[str] = (),
    timeout_s: float = 10.0,
    tenant_id: str | None = None,
) -> list[CanaryResult]:
    """The canary of each model in ``models`` (default: every `generate`-contract model served), in order.

    Raises RequestFailed when the server cannot be asked which models it serves.
    """
    with AdapterClient(url, protocol=protocol, timeout_s=timeout_s) as client:
        names = list(models) or generate_models(client)
        return [run_canary(client, name, tenant_id) for name in names]
