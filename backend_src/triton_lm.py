"""The token-level LM model of the repository, shared by `adapter_lm` (the adapter bank: each batch may
mix adapters and the bare base) and every merged-weight variant `merged_<id>` (one adapter folded into the
base, no bank). One batched generation serves each batch, and every request gets its own response or its
own typed error. Only the `model.py` files import this; it is the one place their Triton code lives.
"""

import logging

import torch
import triton_python_backend_utils as pb_utils
from multiadapter.adapter_ids import decode_adapter_id
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest, GenerationResult
from multiadapter.errors import RequestError
from triton_boundary import (
    ServingMetrics,
    bytes_tensor,
    count_tensor,
    error_response,
    ids_tensor,
    instance_device,
    model_parameters,
    optional_scalar,
    required_bytes,
    route_logging_to_triton,
    token_ids,
)

log = logging.getLogger("triton_lm")


def parse_request(request) -> GenerationRequest:
    return GenerationRequest(
        input_ids=token_ids(request, "input_ids"),
        adapter_id=decode_adapter_id(required_bytes(request, "adapter_id")),
        max_tokens=optional_scalar(request, "max_tokens", int),
        temperature=optional_scalar(request, "temperature", float),
        top_p=optional_scalar(request, "top_p", float),
        top_k=optional_scalar(request, "top_k", int),
        seed=optional_scalar(request, "seed", int),
    )


class TritonPythonModel:
    def initialize(self, args):
        route_logging_to_triton()
        config = EngineConfig.from_parameters(model_parameters(args))
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.engine = Engine.load(config, instance_device(args))
        self.metrics = ServingMetrics(args["model_name"])
        merged = self.engine.merged
        if merged is not None:
            log.info(
                "serving adapter %r %s merged into %s on %s (%s)",
                merged.adapter_id,
                merged.adapter_version,
                merged.base_model,
                self.engine.device,
                self.engine.dtype,
            )
            return
        entries = self.engine.bank.entries()
        log.info(
            "serving %s on %s (%s) with %d adapter(s): %s%s",
            config.base_model,
            self.engine.device,
            self.engine.dtype,
            len(entries),
            ", ".join(f"{e.adapter_id}={e.version}" for e in entries) or "none",
            f"; refused: {sorted(self.engine.refused)}" if self.engine.refused else "",
        )

    def execute(self, requests):
        outcomes = [None] * len(requests)
        parsed, positions = [], []
        for i, request in enumerate(requests):
            try:
                parsed.append(parse_request(request))
                positions.append(i)
            except RequestError as exc:
                outcomes[i] = exc
        ids = [p.adapter_id for p in parsed]
        if self.engine.merged is not None:  # it serves its own adapter for "" too; other ids fail row by row
            merged = self.engine.merged.adapter_id
            ids = [merged if adapter_id == "" else adapter_id for adapter_id in ids]
        self.metrics.record_batch(ids)
        try:
            for i, outcome in zip(positions, self.engine.generate(parsed), strict=True):
                outcomes[i] = outcome
        except Exception as exc:  # a model-wide failure still answers every request once
            for i in positions:
                outcomes[i] = exc
        return [self._response(o) for o in outcomes]

    def _response(self, outcome):
        if not isinstance(outcome, GenerationResult):
            self.metrics.record_error(outcome)
            return error_response(outcome)
        return pb_utils.InferenceResponse(
            output_tensors=[
                ids_tensor("output_ids", outcome.output_ids),
                bytes_tensor("served_adapter_id", outcome.adapter_id),
                bytes_tensor("adapter_version", outcome.adapter_version),
                count_tensor("generated_tokens", len(outcome.output_ids)),
            ]
        )

    def finalize(self):
        self.engine = None
