# Developer entry points. `make serve` runs the server on the committed demo model unless BASE_MODEL is given.
PYTHON ?= python3

VENV := .venv
VENV_PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.stamp

DEMO_DIR := models/demo
DEMO_SEED ?= 0
TINY_DIR := build/tiny
TINY_STAMP := $(TINY_DIR)/tiny_model.json

HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# Extra launcher arguments, e.g. SERVE_ARGS='--log-verbose -- --disable-auto-complete-config'.
SERVE_ARGS ?=
BENCH_ARGS ?=
SERVING_BENCH_ARGS ?=
CONTINUOUS_BENCH_ARGS ?=
CACHE_BENCH_ARGS ?=
QUANTIZED_BENCH_ARGS ?=
SERVED_PATH_BENCH_ARGS ?=
# Load test (python -m loadtest; traffic options in LOADTEST_ARGS, e.g. LOADTEST_ARGS='--popularity zipf:1.2').
HOST ?= 127.0.0.1
USERS ?= 16
SPAWN_RATE ?= 8
DURATION ?= 60s
PROTOCOL ?= both
LOADTEST_ARGS ?=
SOAK_DURATION ?= 10m
BENCH_USERS ?= 8,32,64
BENCH_DURATION ?= 60s
LOAD_FLAGS = --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(DURATION) --protocol $(PROTOCOL) $(LOADTEST_ARGS)

# Without BASE_MODEL the committed demo model and its adapters are served; an explicit BASE_MODEL gets no
# default adapters, since the demo ones would not fit it.
ifeq ($(strip $(BASE_MODEL)),)
SERVE_BASE_MODEL := $(DEMO_DIR)/base
SERVE_ADAPTER_DIR := $(if $(strip $(ADAPTER_DIR)),$(ADAPTER_DIR),$(DEMO_DIR)/adapters)
SERVE_DEPS :=
else
SERVE_BASE_MODEL := $(BASE_MODEL)
SERVE_ADAPTER_DIR := $(ADAPTER_DIR)
SERVE_DEPS :=
endif

.PHONY: venv tiny-model demo-models serve merged test lint bench clean \
	loadtest loadtest-local loadtest-ui soak loadtest-bench up down logs gpu-check

venv: $(VENV_STAMP)

$(VENV_STAMP): requirements.txt requirements-dev.txt
	test -x $(VENV_PY) || $(PYTHON) -m venv $(VENV)
	$(VENV_PY) -m pip install -r requirements.txt -r requirements-dev.txt
	touch $@

# Re-trains the committed demo model (base, 3 LoRA + 3 bottleneck adapters), seeded: ~27 min on 2 CPU cores;
# ONLY=title,shift re-trains just those adapters on the installed base.
demo-models: $(VENV_STAMP)
	$(VENV_PY) -m training.demo --out $(DEMO_DIR) --seed $(DEMO_SEED) $(if $(strip $(ONLY)),--only $(ONLY))

tiny-model: $(TINY_STAMP)

# The builder writes its stamp last and rebuilds only when its version or seed changed.
$(TINY_STAMP): | $(VENV_STAMP)
	$(VENV_PY) -m tools.tiny_model --out $(TINY_DIR)

# The adapter cache and tenants: ADAPTER_DEVICE_BYTES=512MiB ADAPTER_HOST_BYTES=2GiB PRELOAD='*'|ids|'' PIN=ids
# TENANTS=path/to/tenants.json, and the base's quantization QUANTIZE=nf4|int8 (the launcher reads these from the
# environment; see python -m server --help).
serve: $(VENV_STAMP) $(SERVE_DEPS)
	$(VENV_PY) -m server \
		--base-model "$(SERVE_BASE_MODEL)" \
		$(if $(strip $(SERVE_ADAPTER_DIR)),--adapter-dir "$(SERVE_ADAPTER_DIR)") \
		$(if $(strip $(MERGED)),--merged "$(MERGED)") \
		--http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
		$(SERVE_ARGS)

# Merged-weight variants of LoRA adapters (ADAPTERS=upper,rot13), for `make serve MERGED=...` and compare.
merged: $(VENV_STAMP)
	$(if $(strip $(ADAPTERS)),,$(error give the adapters to merge: make merged ADAPTERS=upper,rot13))
	$(VENV_PY) -m tools.merge --adapters "$(ADAPTERS)" \
		--base-model "$(SERVE_BASE_MODEL)" \
		$(if $(strip $(SERVE_ADAPTER_DIR)),--adapter-dir "$(SERVE_ADAPTER_DIR)")

test: $(VENV_STAMP)
	$(VENV_PY) -m pytest -q tests

lint: $(VENV_STAMP)
	$(VENV)/bin/ruff check .

# In-process core benchmark, the adapter bank against merged variants and continuous batching through the
# real server, then the adapter cache (cold adapters, 1,000 in the store, a working set over the budget).
bench: $(VENV_STAMP)
	$(VENV_PY) -m bench $(BENCH_ARGS)
	$(VENV_PY) -m bench.serving $(SERVING_BENCH_ARGS)
	$(VENV_PY) -m bench.continuous $(CONTINUOUS_BENCH_ARGS)
	$(VENV_PY) -m bench.adapter_cache $(CACHE_BENCH_ARGS)
	$(VENV_PY) -m bench.quantized $(QUANTIZED_BENCH_ARGS)
	$(VENV_PY) -m bench.served_path $(SERVED_PATH_BENCH_ARGS)

# Locust against a running server (HOST, HTTP_PORT, GRPC_PORT); every answer checked; reports in build/loadtest/.
loadtest: $(VENV_STAMP)
	$(VENV_PY) -m loadtest run --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) $(LOAD_FLAGS)

# The same against a demo server of its own, on free ports, stopped afterwards.
loadtest-local: $(VENV_STAMP)
	$(VENV_PY) -m loadtest local $(LOAD_FLAGS)

# Locust's web UI on http://127.0.0.1:8089 against HOST.
loadtest-ui: $(VENV_STAMP)
	$(VENV_PY) -m loadtest ui --host $(HOST) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) $(LOAD_FLAGS)

# Mixed load on a demo server of its own for SOAK_DURATION, sampling its memory (not in make test).
soak: $(VENV_STAMP)
	$(VENV_PY) -m loadtest soak --users $(USERS) --spawn-rate $(SPAWN_RATE) --duration $(SOAK_DURATION) \
		--protocol $(PROTOCOL) $(LOADTEST_ARGS)

# The load test at BENCH_USERS users, BENCH_DURATION each, on one demo server: table + plot (not in make test).
loadtest-bench: $(VENV_STAMP)
	$(VENV_PY) -m loadtest bench --users-list $(BENCH_USERS) --duration $(BENCH_DURATION) \
		--protocol $(PROTOCOL) $(LOADTEST_ARGS)

clean:
	rm -rf build .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

# Docker (docker/, README: Deploying it): the server on NGC's Triton image, Prometheus, Grafana and Locust.
# DEVICE=cpu runs the same image without a GPU (fp32); ADAPTER_STORE=/path/to/adapters mounts your store.
DEVICE ?= gpu
DOCKER_COMPOSE ?= docker compose
GRAFANA_PORT ?= 3000
PROMETHEUS_PORT ?= 9090
LOCUST_PORT ?= 8089
COMPOSE = DEVICE=$(DEVICE) HTTP_PORT=$(HTTP_PORT) GRPC_PORT=$(GRPC_PORT) METRICS_PORT=$(METRICS_PORT) \
	GRAFANA_PORT=$(GRAFANA_PORT) PROMETHEUS_PORT=$(PROMETHEUS_PORT) LOCUST_PORT=$(LOCUST_PORT) \
	$(if $(strip $(ADAPTER_STORE)),ADAPTER_STORE=$(abspath $(ADAPTER_STORE))) \
	$(DOCKER_COMPOSE) -f docker/docker-compose.yml $(if $(filter gpu,$(DEVICE)),-f docker/docker-compose.gpu.yml)

# Builds the images, starts everything and waits for the server's health check (a real inference).
up:
	$(if $(filter gpu cpu,$(DEVICE)),,$(error DEVICE must be gpu or cpu))
	$(COMPOSE) up --detach --build --wait --wait-timeout 1200
	@echo "Triton      http://localhost:$(HTTP_PORT) (HTTP), localhost:$(GRPC_PORT) (gRPC)"
	@echo "Metrics     http://localhost:$(METRICS_PORT)/metrics"
	@echo "Grafana     http://localhost:$(GRAFANA_PORT) (dashboard: Multi-adapter server)"
	@echo "Prometheus  http://localhost:$(PROMETHEUS_PORT)"
	@echo "Locust      http://localhost:$(LOCUST_PORT)"

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow --tail=200

# On a machine with a CUDA GPU (and a CUDA build of torch): the GPU tests (bf16 against PEFT and float32,
# mixed batches, merged parity; skipped elsewhere) must all run, then a short mixed-adapter bench.
gpu-check: $(VENV_STAMP)
	$(VENV_PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA GPU')"
	$(VENV_PY) -m pytest -q -rs -m gpu tests
	$(VENV_PY) -m bench.gpu_check --device cuda
