"""Build merged-weight variants of LoRA adapters and the Triton models that serve them.

``python -m tools.merge --adapters upper,rot13 [--base-model DIR] [--adapter-dir DIR] [--out build/merged]``
writes, for each adapter id::

    <out>/<id>/weights/                         the base with W' = W + s·B·A folded in (safetensors,
                                                computed in float32, cast to --dtype), its tokenizer and
                                                merged_adapter.json
    <out>/<id>/repository/merged_<id>/          token-level Python model serving those weights (no bank)
    <out>/<id>/repository/generate_merged_<id>/ ensemble: tokenizer -> merged_<id> -> detokenizer

Each variant's repository is passed to tritonserver as one more ``--model-repository`` beside the
project's (`python -m server --merged upper,rot13` does that). Weights are rebuilt only when missing,
incomplete, or made from another adapter version, base (path or files) or dtype, or by another version of
this tool (``--force`` rebuilds anyway); the model directories are rendered from tools/repository_templates
every time. Every adapter is validated before anything is written. Adapter ids are names under
--adapter-dir, never paths. Bottleneck adapters are refused: they are non-linear and cannot be folded into
the weights.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BACKEND_SRC = PROJECT_ROOT / "backend_src"
if str(BACKEND_SRC) not in sys.path:
    sys.path.insert(0, str(BACKEND_SRC))

import torch  # noqa: E402
from multiadapter.adapter_format import BOTTLENECK, adapter_format  # noqa: E402
from multiadapter.adapter_ids import adapter_directory, check_adapter_id, discover_adapter_ids  # noqa: E402
from multiadapter.base_model import describe_modules, load_base_model  # noqa: E402
from multiadapter.config import DTYPES  # noqa: E402
from multiadapter.errors import AdapterLoadError, ConfigError, InvalidRequest  # noqa: E402
from multiadapter.lora_loading import load_lora_adapter  # noqa: E402
from multiadapter.merged_variant import MergedInfo  # noqa: E402
from multiadapter.merging import merge_into  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tools.build_cache import locked, read_stamp  # noqa: E402
from tools.templates import TemplateError, fill_tree, replace_tree  # noqa: E402

LOG = logging.getLogger("tools.merge")

TEMPLATES = PROJECT_ROOT / "tools" / "repository_templates"
TOOL_VERSION = 1  # bump when the merge or the written layout changes: every variant is rebuilt
STAMP_FILE = "build.json"  # in the weights directory, written last
DEFAULT_OUT = PROJECT_ROOT / "build" / "merged"
DEFAULT_BASE_MODEL = PROJECT_ROOT / "models" / "demo" / "base"
DEFAULT_ADAPTER_DIR = PROJECT_ROOT / "models" / "demo" / "adapters"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU")
# Weight files of the base that the merged directory replaces; everything else (tokenizer) is copied.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class MergeError(Exception):
    """A variant cannot be built; the message says which adapter and why."""


def merged_model_name(adapter_id: str) -> str:
    return f"merged_{adapter_id}"


def merged_ensemble_name(adapter_id: str) -> str:
    return f"generate_merged_{adapter_id}"


@dataclass(frozen=True)
class Variant:
    """Where one adapter's merged variant lives under the output root."""

    adapter_id: str
    root: Path

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def repository(self) -> Path:
        return self.root / "repository"

    @classmethod
    def under(cls, out: Path, adapter_id: str) -> Variant:
        check_adapter_id(adapter_id)
        return cls(adapter_id, out / adapter_id)


def parse_ids(text: str) -> list[str]:
    """Comma-separated adapter ids, each validated as a name; duplicates dropped, order kept."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise MergeError("no adapter ids given (e.g. --adapters upper,rot13)")
    for adapter_id in ids:
        try:
            check_adapter_id(adapter_id)
        except InvalidRequest as exc:
            raise MergeError(str(exc)) from None
    return list(dict.fromkeys(ids))


def _adapter_dir(adapter_root: Path, adapter_id: str) -> Path:
    try:
        directory = adapter_directory(adapter_root, adapter_id)
    except InvalidRequest as exc:
        raise MergeError(str(exc)) from None
    if not directory.is_dir():
        known = ", ".join(discover_adapter_ids(adapter_root)) or "none"
        raise MergeError(f"adapter {adapter_id!r} is not in {adapter_root} (known: {known})")
    if adapter_format(adapter_id, directory) == BOTTLENECK:
        raise MergeError(
            f"adapter {adapter_id!r} is a bottleneck adapter and cannot be merged: it applies a "
            "non-linearity between its down and up projections and reads the residual stream, so no "
            "weight matrix W' = W + delta reproduces it. Serve it through `generate` (the adapter bank)."
        )
    return directory


def base_fingerprint(base_model: Path) -> str:
    """Identity of the base's files: each file's name, size and modification time, and config.json's bytes.
    Replacing the base's weights in place changes it."""
    digest = hashlib.sha256((base_model / "config.json").read_bytes())
    for path in sorted(base_model.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "sha256:" + digest.hexdigest()[:16]


def _stamp(info: MergedInfo, fingerprint: str) -> dict[str, object]:
    return {"tool_version": TOOL_VERSION, "base_fingerprint": fingerprint, **dataclasses.asdict(info)}


def _is_current(variant: Variant, stamp: dict[str, object]) -> bool:
    """Whether the variant's weights were built, completely, from this adapter version, base and dtype by
    this version of the tool."""
    return read_stamp(variant.weights / STAMP_FILE) == stamp and any(variant.weights.glob("*.safetensors"))


def _write_weights(
    model: torch.nn.Module, base_model: Path, variant: Variant, info: MergedInfo, stamp: dict[str, object]
) -> None:
    """Save `model` (merged) with the base's tokenizer files as the variant's weights; the stamp is written
    last and the directory renamed into place, so an interrupted build is never taken for a finished one."""
    staging = variant.root / ".weights.writing"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    for path in sorted(base_model.iterdir()):
        if (
            path.is_file()
            and path.suffix not in _WEIGHT_SUFFIXES
            and path.name not in _WEIGHT_INDEXES
            and not (staging / path.name).exists()
        ):
            shutil.copyfile(path, staging / path.name)
    info.save(staging)
    (staging / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    replace_tree(staging, variant.weights)


def render_models(variant: Variant, info: MergedInfo, instance_kind: str, num_threads: int = 0) -> list[Path]:
    """Render merged_<id> and generate_merged_<id> into the variant's repository from the templates."""
    name, ensemble = merged_model_name(variant.adapter_id), merged_ensemble_name(variant.adapter_id)
    written = fill_tree(
        TEMPLATES / "merged_lm",
        variant.repository / name,
        {
            "name": name,
            "adapter_id": info.adapter_id,
            "adapter_version": info.adapter_version,
            "merged_model": str(variant.weights.resolve()),
            "dtype": info.dtype,
            "instance_kind": instance_kind,
            "num_threads": str(num_threads),
            "backend_src": str(BACKEND_SRC),
        },
        staging_root=variant.root,
    )
    written += fill_tree(
        TEMPLATES / "generate_ensemble",
        variant.repository / ensemble,
        {
            "name": ensemble,
            "token_model": name,
            "description": f"Adapter {info.adapter_id} merged into the base: tokenizer -> {name} -> "
            "detokenizer.",
        },
        staging_root=variant.root,
    )
    return written


def build_variants(
    adapter_ids: Sequence[str],
    *,
    base_model: Path = DEFAULT_BASE_MODEL,
    adapter_dir: Path = DEFAULT_ADAPTER_DIR,
    out: Path = DEFAULT_OUT,
    dtype: str = "float32",
    instance_kind: str = "KIND_CPU",
    num_threads: int = 0,
    force: bool = False,
    progress: bool = True,
) -> list[Variant]:
    """Build (or reuse) the merged variant of each adapter; returns them in order. `num_threads` is each
    serving process's torch thread count (0: torch's default).

    Every id is checked (a name under `adapter_dir`, a LoRA adapter) before anything is written.
    Raises MergeError naming the adapter at fault.
    """
    if dtype not in DTYPES:
        raise MergeError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if instance_kind not in INSTANCE_KINDS:
        raise MergeError(f"instance kind must be one of {INSTANCE_KINDS}, got {instance_kind!r}")
    if num_threads < 0:
        raise MergeError(f"num_threads must be >= 0, got {num_threads}")
    base_model, adapter_dir, out = base_model.resolve(), adapter_dir.resolve(), out.resolve()
    if not (base_model / "config.json").is_file():
        raise MergeError(f"base model {base_model} is not a Hugging Face model directory (no config.json)")
    directories = {adapter_id: _adapter_dir(adapter_dir, adapter_id) for adapter_id in adapter_ids}

    # Every adapter is loaded and validated against the float32 base before anything is written.
    base, _ = load_base_model(base_model, torch.device("cpu"), torch.float32)
    modules = describe_modules(base)
    loaded = {}
    for adapter_id, directory in directories.items():
        try:
            loaded[adapter_id] = load_lora_adapter(adapter_id, directory, modules)
        except AdapterLoadError as exc:
            raise MergeError(str(exc)) from None

    fingerprint = base_fingerprint(base_model)
    variants = []
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / ".lock"):  # one builder at a time (make merged beside make serve MERGED=...)
        bar = tqdm(total=len(loaded), desc="merged variants", unit="adapter", disable=not progress)
        with bar:
            for adapter_id, adapter in loaded.items():
                variant = Variant.under(out, adapter_id)
                variant.root.mkdir(parents=True, exist_ok=True)
                info = MergedInfo(adapter_id, adapter.version, str(base_model), dtype)
                stamp = _stamp(info, fingerprint)
                if force or not _is_current(variant, stamp):
                    bar.set_postfix_str(f"{adapter_id}: merging")
                    model = copy.deepcopy(base)  # the merge is computed in float32, then cast
                    merge_into(model, adapter, DTYPES[dtype])
                    bar.set_postfix_str(f"{adapter_id}: writing")
                    _write_weights(model, base_model, variant, info, stamp)
                    del model
                    LOG.info("%s: merged %s into %s", adapter_id, adapter.version, variant.weights)
                else:
                    LOG.info("%s: %s is up to date", adapter_id, variant.weights)
                render_models(variant, info, instance_kind, num_threads)
                variants.append(variant)
                bar.update()
    return variants


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.merge", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--adapters", required=True, help="comma-separated LoRA adapter ids, e.g. upper,rot13"
    )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=Path(os.environ.get("BASE_MODEL") or DEFAULT_BASE_MODEL),
        help="Hugging Face base model directory (env BASE_MODEL; default: the demo base)",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=Path(os.environ.get("ADAPTER_DIR") or DEFAULT_ADAPTER_DIR),
        help="directory with one subdirectory per adapter (env ADAPTER_DIR; default: the demo adapters)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output root (default: build/merged)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the merged weights and serving"
    )
    parser.add_argument(
        "--instance-kind", default="KIND_CPU", choices=INSTANCE_KINDS, help="Triton instance kind"
    )
    parser.add_argument(
        "--num-threads", type=int, default=0, help="torch threads per serving process (0: torch default)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild the weights even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        variants = build_variants(
            parse_ids(args.adapters),
            base_model=args.base_model,
            adapter_dir=args.adapter_dir,
            out=args.out,
            dtype=args.dtype,
            instance_kind=args.instance_kind,
            num_threads=args.num_threads,
            force=args.force,
        )
    except (MergeError, TemplateError, ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for variant in variants:
        print(
            f"{variant.adapter_id}: {variant.repository} "
            f"(models {merged_model_name(variant.adapter_id)}, {merged_ensemble_name(variant.adapter_id)})"
        )
    LOG.info("done in %.1f s", time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
