"""What every `python -m bench.<name>` shares: its command line's common options and its two report files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "build" / "bench"


def parser(prog: str, doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A parser with `--quick` (a smoke run, described by `quick_help`) and `--out` (the report directory);
    the description is the first line of the module's docstring `doc`."""
    result = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0] if doc else None)
    result.add_argument("--quick", action="store_true", help=quick_help)
    result.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report directory ({DEFAULT_OUT})")
    return result


def write(out: Path, name: str, markdown: str, data: object) -> None:
    """`<out>/<name>.md` (the markdown) and `<out>/<name>.json` (`data`), then the markdown on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    text = markdown if markdown.endswith("\n") else markdown + "\n"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.write(text)
