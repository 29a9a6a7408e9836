"""Shared fixtures: the tiny model built once, and ONE real tritonserver per test session."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "backend_src"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny base model and its PEFT adapters, plus one broken adapter the server must refuse."""
    from tools.tiny_model import build_tiny

    root = tmp_path_factory.mktemp("tiny")
    paths = build_tiny(root / "model")
    adapters = root / "adapters"
    shutil.copytree(paths.adapter_dir, adapters)
    bottlenecks = _add_bottleneck_adapters(paths.base_model, adapters)
    broken = adapters / "broken"
    shutil.copytree(adapters / paths.adapter_ids[0], broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["use_dora"] = True
    (broken / "adapter_config.json").write_text(json.dumps(config))
    return TinyServing(paths.base_model, adapters, (*paths.adapter_ids, *bottlenecks))


SERVED_BOTTLENECKS = {"pfeiffer": "seq_bn", "houlsby": "double_seq_bn", "parallel": "par_bn"}


def _add_bottleneck_adapters(base_model: Path, adapter_dir: Path) -> tuple[str, ...]:
    """One AdapterHub adapter of each placement, random non-zero weights, beside the PEFT LoRA ones."""
    import adapters
    from transformers import AutoModelForCausalLM

    from tests.adapterhub_factories import randomize_bottleneck

    model = AutoModelForCausalLM.from_pretrained(base_model)
    adapters.init(model)
    for i, (adapter_id, preset) in enumerate(SERVED_BOTTLENECKS.items()):
        model.add_adapter(adapter_id, config=preset)
        randomize_bottleneck(model, adapter_id, seed=500 + i)
        model.save_adapter(str(adapter_dir / adapter_id), adapter_id, use_safetensors=True)
    return tuple(SERVED_BOTTLENECKS)


@dataclass(frozen=True)
class TinyServing:
    base_model: Path
    adapter_dir: Path
    adapter_ids: tuple[str, ...]


@pytest.fixture(scope="session")
def triton_server(tiny_model, tmp_path_factory):
    """One real tritonserver for the whole session, started through the project's launcher."""
    from server.process import start_server

    log_path = tmp_path_factory.mktemp("triton") / "tritonserver.log"
    server = start_server(
        ROOT / "model_repository",
        tiny_model.base_model,
        tiny_model.adapter_dir,
        log_path=log_path,
        ready_timeout_s=600,
    )
    yield server
    server.stop()
    # Fails the session's last test if the server crashed or logged an unexpected stub failure.
    text = log_path.read_text(errors="replace")
    assert "is not healthy" not in text, "a Python stub died during the tests"


@pytest.fixture(scope="session")
def offline_engine(tiny_model):
    """The same model and adapters in-process: the oracle for answers the server must give."""
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine
    from multiadapter.tokenization import TextCodec

    engine = Engine.load(EngineConfig(base_model=tiny_model.base_model, adapter_dir=tiny_model.adapter_dir))
    return engine, TextCodec.load(tiny_model.base_model)
