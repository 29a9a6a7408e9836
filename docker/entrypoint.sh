#!/bin/bash
# The container's entry point: the launcher (python -m server) on NGC's tritonserver, with the engine's
# model on the GPU unless DEVICE=cpu. Extra arguments go to the launcher; BASE_MODEL, ADAPTER_DIR, TENANTS,
# ADAPTER_DEVICE_BYTES, ... are read by the launcher from the environment.
set -euo pipefail
device="${DEVICE:-gpu}"
case "$device" in
  gpu) triton_args=(-- --model-config-name=gpu) ;;  # generate_stream/configs/gpu.pbtxt: KIND_GPU, bf16
  cpu) triton_args=() ;;
  *) echo "DEVICE must be gpu or cpu, got '$device'" >&2; exit 2 ;;
esac
exec python3 -m server --address 0.0.0.0 "$@" "${triton_args[@]}"
