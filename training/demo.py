"""Train the demo model: a tiny byte-level Llama that echoes its prompt, and adapters that transform it.

``python -m training.demo --out models/demo [--seed 0] [--only title,shift]`` writes::

    <out>/base/                 LlamaForCausalLM (safetensors) + tokenizer + generation_config
    <out>/adapters/<id>/        one adapter per spec in training.recipe.ADAPTERS: PEFT LoRA, or AdapterHub
                                bottleneck (seq_bn, double_seq_bn, par_bn), each in safetensors
    <out>/tasks.json            the prompt domain, and what the base ("") and each adapter answer
    <out>/accuracy.json         greedy exact match on held-out prompts, misses included

and prints the accuracy table as Markdown. Everything is trained and then scored from the saved files in a
staging directory next to ``<out>``; the files in ``<out>`` are replaced only if every model reaches the
accuracy bar, so a bad run never overwrites good weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from tools.build_cache import seeded
from tools.tiny_model import build_tokenizer
from training.adapter_training import save_trained_adapter, with_trainable_adapter
from training.data import training_batches
from training.evaluate import Score, exact_match
from training.model import build_base_model, load_demo_model
from training.prompts import ALPHABET, MAX_LEN, MIN_LEN, evaluation_prompts
from training.recipe import (
    ACCURACY_BAR,
    ADAPTER_STYLES,
    ADAPTERS,
    BASE_RECIPE,
    BASE_SHAPE,
    BASE_STYLES,
    BASE_TASK,
    EVAL_PROMPTS,
    SCORED_DTYPES,
    AdapterSpec,
)
from training.tasks import get_task
from training.train import train

LOG = logging.getLogger(__name__)

BASE_ID = ""  # how tasks.json and accuracy.json name the base: a request without an adapter
BASE_DIR = "base"
ADAPTER_DIR = "adapters"
TASKS_FILE = "tasks.json"
ACCURACY_FILE = "accuracy.json"
OUTPUTS = (BASE_DIR, ADAPTER_DIR, TASKS_FILE, ACCURACY_FILE)


@dataclass(frozen=True)
class Row:
    """One line of the accuracy table: a model (BASE_ID for the base), its task, its score per dtype."""

    adapter_id: str
    task: str
    scores: dict[str, Score]  # by dtype name, SCORED_DTYPES order

    def passes(self) -> bool:
        return all(score.accuracy >= ACCURACY_BAR for score in self.scores.values())


def train_demo(out: Path, seed: int = 0, only: Sequence[str] = ()) -> list[Row]:
    """Train, save and score the base and every adapter; install them under ``out`` if all pass.

    With ``only``, just those adapters are trained, on the base installed in ``out``; the other installed
    files are kept. Every stream is seeded by name, so this gives the same weights as a full run with the
    same seed and thread count, provided the installed base came from that seed (not checked).
    """
    staging = out.with_name(f".{out.name}.staging")
    shutil.rmtree(staging, ignore_errors=True)
    if only:
        _stage_installed(out, staging, only)
    else:
        _train_base(build_tokenizer(), staging / BASE_DIR, seed)
    for spec in ADAPTERS:
        if only and spec.adapter_id not in only:
            continue
        adapter_dir = staging / ADAPTER_DIR / spec.adapter_id
        _train_adapter(spec, staging / BASE_DIR, adapter_dir, seed, base_name=str(out / BASE_DIR))

    table = score_saved(staging)
    _write_json(staging / TASKS_FILE, tasks_manifest())
    _write_json(staging / ACCURACY_FILE, accuracy_report(table))
    if all(row.passes() for row in table):
        _install(staging, out)
    else:
        LOG.error(
            "below the %.0f%% bar: %s kept as it was, this run left in %s", 100 * ACCURACY_BAR, out, staging
        )
    return table


def score_saved(root: Path) -> list[Row]:
    """Reload the base and each adapter from ``root`` and score them on the held-out prompts."""
    prompts = evaluation_prompts(EVAL_PROMPTS)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(root / BASE_DIR)
    table = []
    for adapter_id, task in _task_by_id().items():
        adapter_dir = root / ADAPTER_DIR / adapter_id if adapter_id != BASE_ID else None
        scores = {}
        for dtype in SCORED_DTYPES:
            model = load_demo_model(root / BASE_DIR, adapter_dir, dtype)
            scores[_dtype_name(dtype)] = exact_match(model, tokenizer, prompts, get_task(task).apply)
        table.append(Row(adapter_id, task, scores))
        LOG.info(
            "%-8s %-8s %s",
            adapter_id or "(base)",
            task,
            "  ".join(f"{name} {score.accuracy:.1%}" for name, score in scores.items()),
        )
    return table


def tasks_manifest() -> dict[str, object]:
    """What each model answers (and each adapter's kind), keyed by adapter id (BASE_ID for the base), and
    the prompt domain."""
    return {
        "prompts": {"alphabet": ALPHABET, "min_length": MIN_LEN, "max_length": MAX_LEN},
        "tasks": {
            adapter_id: {
                "task": task,
                "description": get_task(task).description,
                **({"kind": _kind_by_id()[adapter_id]} if adapter_id != BASE_ID else {}),
            }
            for adapter_id, task in _task_by_id().items()
        },
    }


def accuracy_report(table: list[Row]) -> dict[str, object]:
    return {
        "bar": ACCURACY_BAR,
        "prompts": EVAL_PROMPTS,
        "rows": [
            {
                "adapter_id": row.adapter_id,
                "task": row.task,
                **{
                    dtype: {
                        "correct": score.correct,
                        "total": score.total,
                        "accuracy": score.accuracy,
                        "misses": [
                            {"prompt": prompt, "expected": expected, "got": got}
                            for prompt, expected, got in score.misses
                        ],
                    }
                    for dtype, score in row.scores.items()
                },
            }
            for row in table
        ],
    }


def markdown_table(table: list[Row]) -> str:
    dtypes = list(table[0].scores)
    lines = [
        "| adapter | task | " + " | ".join(f"exact match ({dtype})" for dtype in dtypes) + " |",
        "|---|---|" + "---:|" * len(dtypes),
    ]
    for row in table:
        name = f"`{row.adapter_id}`" if row.adapter_id != BASE_ID else "(base)"
        cells = [f"{score.correct} / {score.total} ({score.accuracy:.1%})" for score in row.scores.values()]
        lines.append(f"| {name} | {row.task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _task_by_id() -> dict[str, str]:
    return {BASE_ID: BASE_TASK, **{spec.adapter_id: spec.task for spec in ADAPTERS}}


def _kind_by_id() -> dict[str, str]:
    """Each adapter's kind: `lora`, or the AdapterHub bottleneck preset."""
    return {spec.adapter_id: spec.kind for spec in ADAPTERS}


def _train_base(tokenizer: PreTrainedTokenizerFast, out: Path, seed: int) -> None:
    model = build_base_model(tokenizer, BASE_SHAPE, _torch_seed(seed, "base/init"))
    batches = training_batches(
        _rng(seed, "base/data"),
        tokenizer,
        get_task(BASE_TASK).apply,
        BASE_RECIPE.batch_size,
        styles=BASE_STYLES,
    )
    train(model, batches, BASE_RECIPE, f"base ({BASE_TASK})")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _train_adapter(spec: AdapterSpec, base_dir: Path, out: Path, seed: int, base_name: str) -> None:
    """Train one adapter (PEFT LoRA or AdapterHub bottleneck) on a fresh, frozen copy of the saved base.

    ``base_name`` is recorded as the adapter's base model: where the base is installed, not staged.
    """
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    with seeded(_torch_seed(seed, f"adapter/{spec.adapter_id}/init")):
        model = with_trainable_adapter(load_demo_model(base_dir), spec)
    batches = training_batches(
        _rng(seed, f"adapter/{spec.adapter_id}/data"),
        tokenizer,
        get_task(spec.task).apply,
        spec.recipe.batch_size,
        styles=ADAPTER_STYLES,
    )
    train(model, batches, spec.recipe, spec.label)
    save_trained_adapter(model, spec, out, base_name)


def _stage_installed(out: Path, staging: Path, only: Sequence[str]) -> None:
    """Copy the installed base and the adapters not in ``only`` to ``staging``; ValueError naming what is
    unknown or missing."""
    known = [spec.adapter_id for spec in ADAPTERS]
    unknown = sorted(set(only) - set(known))
    if unknown:
        raise ValueError(f"unknown adapter(s) {', '.join(unknown)}; known: {', '.join(known)}")
    kept = [adapter_id for adapter_id in known if adapter_id not in only]
    missing = [
        str(path)
        for path in (out / BASE_DIR, *(out / ADAPTER_DIR / adapter_id for adapter_id in kept))
        if not path.is_dir()
    ]
    if missing:
        raise ValueError(f"not installed, train everything instead: {', '.join(missing)}")
    shutil.copytree(out / BASE_DIR, staging / BASE_DIR)
    for adapter_id in kept:
        shutil.copytree(out / ADAPTER_DIR / adapter_id, staging / ADAPTER_DIR / adapter_id)


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent generator per named stream: adding an adapter leaves every other stream as is."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode())])


def _torch_seed(seed: int, stream: str) -> int:
    return int(_rng(seed, stream).integers(2**62))


def _write_json(path: Path, payload: object) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _install(staging: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        (staging / name).rename(target)
    staging.rmdir()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/demo"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and training data")
    parser.add_argument(
        "--threads",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="torch CPU threads (default: 2, or fewer cores)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="IDS",
        help="comma-separated adapter ids: train just these on the installed base, keep the rest",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    only = [adapter_id.strip() for adapter_id in args.only.split(",") if adapter_id.strip()]
    try:
        table = train_demo(args.out, seed=args.seed, only=only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    LOG.info("trained and scored in %.0f s", time.perf_counter() - started)
    print(markdown_table(table))
    return 0 if all(row.passes() for row in table) else 1


if __name__ == "__main__":
    sys.exit(main())
