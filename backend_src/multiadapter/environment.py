"""Environment variables the launcher (`python -m server`) sets for the models. No torch here: the tokenizer
and detokenizer steps read them in processes that never import torch."""

ENV_BASE_MODEL = "MULTIADAPTER_BASE_MODEL"
ENV_ADAPTER_DIR = "MULTIADAPTER_ADAPTER_DIR"
# $MULTIADAPTER_<PARAMETER> overrides some model parameters (config.ENV_OVERRIDES), e.g.
# MULTIADAPTER_ADAPTER_DEVICE_BYTES=512MiB.
ENV_PREFIX = "MULTIADAPTER_"
