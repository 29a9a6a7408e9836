"""Environment variables the launcher (`python -m server`) sets for the models. No torch here: the tokenizer
and detokenizer steps read them in processes that never import torch."""

ENV_BASE_MODEL = "MULTIADAPTER_BASE_MODEL"
ENV_ADAPTER_DIR = "MULTIADAPTER_ADAPTER_DIR"
# A secret tenant id the launcher's health canary sends: with a tenant policy it may ask for the bare base
# (adapter_id ""), and nothing else. Set only by the launcher, derived from its per-run admin token.
ENV_CANARY_TENANT = "MULTIADAPTER_CANARY_TENANT"
# $MULTIADAPTER_<PARAMETER> overrides some model parameters (config.ENV_OVERRIDES), e.g.
# MULTIADAPTER_ADAPTER_DEVICE_BYTES=512MiB.
ENV_PREFIX = "MULTIADAPTER_"
# Parameters that $MULTIADAPTER_<NAME upper-cased> overrides when set (the launcher's flags set them).
ENV_OVERRIDES = (
    "adapter_device_bytes",
    "adapter_host_bytes",
    "preload_adapters",
    "pinned_adapters",
    "tenant_policy",
    "quantization",
)
