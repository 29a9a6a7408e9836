"""The benchmark's model: a seeded random Llama, PEFT LoRA adapters and AdapterHub bottleneck adapters,
built once and reused.

``build_fixture(spec, root)`` writes::

    <root>/base/                 LlamaForCausalLM, safetensors, and the byte-level tokenizer
    <root>/adapters/a<i>/        adapter_config.json + adapter_model.safetensors (PEFT save_pretrained)
    <root>/adapters/<kind>/      adapter_config.json + adapter.safetensors (AdapterHub save_adapter), one
                                 per bottleneck preset in spec.bottleneck_kinds, the directory named after it
    <root>/fixture.json          stamp (builder version + spec), written last

A directory whose stamp matches the spec is reused as is; anything else is rebuilt. PEFT and AdapterHub
only create the adapters; the benchmark loads them all into one bank through the engine's own loaders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import adapters
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from tools.build_cache import locked, read_stamp, seeded
from tools.tiny_model import build_tokenizer

BUILDER_VERSION = 3  # 3: the base has the byte-level tokenizer (served through the ensembles)
STAMP_NAME = "fixture.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# AdapterHub's presets: Pfeiffer, Houlsby and parallel, each with its default reduction_factor.
BOTTLENECK_KINDS = ("seq_bn", "double_seq_bn", "par_bn")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the random Llama and of its adapters: `n_adapters` LoRA adapters, one bottleneck adapter
    per preset in `bottleneck_kinds` (its id is the preset's name)."""

    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    n_adapters: int
    rank: int
    lora_alpha: int
    bottleneck_kinds: tuple[str, ...] = BOTTLENECK_KINDS
    seed: int = 0

    def adapter_ids(self) -> tuple[str, ...]:
        """The LoRA adapters' ids."""
        return tuple(f"a{i}" for i in range(self.n_adapters))

    @property
    def bank_size(self) -> int:
        """Adapters of both kinds, all resident in one bank."""
        return self.n_adapters + len(self.bottleneck_kinds)

    def adapted_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of every matrix an adapter targets, over all layers."""
        h, m = self.hidden, self.intermediate
        per_layer = [(h, h)] * 4 + [(h, m), (h, m), (m, h)]
        return per_layer * self.layers


BENCH_SPEC = ModelSpec(
    layers=8,
    hidden=512,
    heads=8,
    intermediate=1376,
    vocab=2048,
    max_positions=1024,
    n_adapters=8,
    rank=16,
    lora_alpha=32,
)
QUICK_SPEC = ModelSpec(
    layers=2,
    hidden=64,
    heads=4,
    intermediate=128,
    vocab=320,  # the byte-level tokenizer has 260 ids
    max_positions=256,
    n_adapters=8,
    rank=4,
    lora_alpha=8,
)


@dataclass(frozen=True)
class Fixture:
    """A built model directory."""

    spec: ModelSpec
    base_model: Path
    adapter_dir: Path


def build_fixture(spec: ModelSpec, root: Path) -> tuple[Fixture, bool]:
    """Build (or reuse) the model and adapters under `root`. Returns the fixture and whether it was built."""
    root = root.resolve()
    fixture = Fixture(spec, root / "base", root / "adapters")
    root.mkdir(parents=True, exist_ok=True)
    with locked(root / ".lock"):
        if read_stamp(root / STAMP_NAME) == _stamp(spec):
            return fixture, False
        (root / STAMP_NAME).unlink(missing_ok=True)
        for stale in (fixture.base_model, fixture.adapter_dir):
            shutil.rmtree(stale, ignore_errors=True)
        _build_base(spec, fixture.base_model)
        for i, adapter_id in enumerate(spec.adapter_ids(), start=1):
            _build_adapter(
                spec, fixture.base_model, fixture.adapter_dir / adapter_id, seed=spec.seed * 1000 + i
            )
        _build_bottlenecks(spec, fixture.base_model, fixture.adapter_dir, seed=spec.seed * 1000 + 500)
        (root / STAMP_NAME).write_text(json.dumps(_stamp(spec), indent=2) + "\n")
    return fixture, True


def _build_base(spec: ModelSpec, out: Path) -> None:
    config = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.heads,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with seeded(spec.seed):
        model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    # Text requests through the `generate` ensembles need a tokenizer: the demo's byte-level one, whose 260
    # ids all exist in the bench vocabulary.
    tokenizer = build_tokenizer()
    if len(tokenizer) > spec.vocab:
        raise ValueError(f"vocab {spec.vocab} is smaller than the tokenizer's {len(tokenizer)} ids")
    tokenizer.save_pretrained(out)


def _build_adapter(spec: ModelSpec, base_dir: Path, out: Path, seed: int) -> None:
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=spec.rank,
        lora_alpha=spec.lora_alpha,
        target_modules=list(LORA_TARGETS),
        init_lora_weights=False,  # random, non-zero B: the adapter really changes the output
    )
    with seeded(seed):
        model = get_peft_model(base, config)
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)


def _build_bottlenecks(spec: ModelSpec, base_dir: Path, out: Path, seed: int) -> None:
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    adapters.init(base)
    for i, kind in enumerate(spec.bottleneck_kinds):
        base.add_adapter(kind, config=kind)
        _randomize_bottleneck(base, kind, torch.Generator().manual_seed(seed + i))
        base.save_adapter(str(out / kind), kind, use_safetensors=True)


def _randomize_bottleneck(model: torch.nn.Module, name: str, generator: torch.Generator) -> None:
    """Random weights for adapter `name`: AdapterHub zero-initialises the up projection, which would make
    a fresh adapter the identity. Matrices get std 1/sqrt(fan_in), so the residual stream keeps its scale."""
    with torch.no_grad():
        for key, param in model.named_parameters():
            if f".adapters.{name}." not in key:
                continue
            noise = torch.randn(param.shape, generator=generator)
            if key.endswith("scaling") or ("adapter_norm" in key and key.endswith("weight")):
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 2:
                param.copy_(noise / param.shape[1] ** 0.5)
            else:
                param.copy_(0.02 * noise)


def _stamp(spec: ModelSpec) -> dict[str, object]:
    # Through JSON and back, so that tuples compare equal to the lists read from the stamp file.
    return json.loads(json.dumps({"builder_version": BUILDER_VERSION, "spec": dataclasses.asdict(spec)}))
