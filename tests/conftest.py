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


def _serve(log_dir: Path, base_model: Path, adapter_dir: Path, extra_repositories=()):
    """A real tritonserver on the project's repository, started through the launcher; after the session it
    is stopped and its log checked (a crashed or unhealthy stub fails the session's last test)."""
    from server.process import start_server

    log_path = log_dir / "tritonserver.log"
    server = start_server(
        ROOT / "model_repository",
        base_model,
        adapter_dir,
        extra_repositories=list(extra_repositories),
        log_path=log_path,
        ready_timeout_s=600,
    )
    yield server
    server.stop()
    text = log_path.read_text(errors="replace")
    assert "is not healthy" not in text, "a Python stub died during the tests"
    assert "Signal (11)" not in text and "Signal (6)" not in text, "tritonserver crashed during the tests"


@pytest.fixture(scope="session")
def triton_server(tiny_model, tmp_path_factory):
    """One real tritonserver for the whole session on the tiny model and its adapters."""
    yield from _serve(tmp_path_factory.mktemp("triton"), tiny_model.base_model, tiny_model.adapter_dir)


DEMO = ROOT / "models" / "demo"
# The demo's contract (issues 3 and 4): adapter id ("" is the base) -> task. LoRA adapters upper, reverse,
# rot13; bottleneck adapters of each placement: title (seq_bn), shift (double_seq_bn), upper_vowels (par_bn).
DEMO_TASKS = {
    "": "echo",
    "upper": "upper",
    "reverse": "reverse",
    "rot13": "rot13",
    "title": "title",
    "shift": "shift",
    "upper_vowels": "upper_vowels",
}
# The demo's LoRA adapters, also served as merged-weight variants by the demo server.
DEMO_MERGED = ("upper", "reverse", "rot13")


@pytest.fixture(scope="session")
def demo_merged_variants(tmp_path_factory):
    """Merged-weight variants of every demo LoRA adapter, built by the project's merge tool."""
    from tools.merge import build_variants

    return build_variants(
        DEMO_MERGED,
        base_model=DEMO / "base",
        adapter_dir=DEMO / "adapters",
        out=tmp_path_factory.mktemp("merged"),
        progress=False,
    )


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory, demo_merged_variants):
    """One real tritonserver on the committed demo model: `generate` with every demo adapter,
    `generate_merged_<id>` for each LoRA one, and the serving bench's naive PEFT model
    (bench/naive_repository)."""
    from bench.serving import NAIVE_REPOSITORY

    yield from _serve(
        tmp_path_factory.mktemp("triton-demo"),
        DEMO / "base",
        DEMO / "adapters",
        [*(variant.repository for variant in demo_merged_variants), NAIVE_REPOSITORY],
    )


@pytest.fixture(scope="session")
def offline_engine(tiny_model):
    """The same model and adapters in-process: the oracle for answers the server must give (no queue
    timeout: on a loaded CI machine a big offline batch may wait longer than the server's default)."""
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine
    from multiadapter.tokenization import TextCodec

    engine = Engine.load(
        EngineConfig(base_model=tiny_model.base_model, adapter_dir=tiny_model.adapter_dir, queue_timeout_ms=0)
    )
    return engine, TextCodec.load(tiny_model.base_model)
