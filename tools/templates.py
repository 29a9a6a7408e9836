"""Filling model-directory templates: ``{{ name }}`` placeholders, every one filled, nothing left over.

A template directory is copied file by file; files ending in ``.tmpl`` are filled and lose the suffix,
other files are copied as they are. Filling refuses, naming them all at once: a placeholder without a
value, a value no placeholder uses (a misspelt key), a value that would change the file's structure
(a line break or a double quote), and any ``{{`` or ``}}`` left over after filling. The filled tree is
written in a staging directory and renamed into place, so a failed fill leaves nothing half written.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

TEMPLATE_SUFFIX = ".tmpl"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_FORBIDDEN_IN_VALUES = ("\n", "\r", '"', "{{", "}}")


class TemplateError(ValueError):
    """A template could not be filled exactly; the message lists every problem."""


def placeholders(text: str) -> set[str]:
    """The placeholder names used in ``text``."""
    return set(PLACEHOLDER.findall(text))


def fill(text: str, values: Mapping[str, str], *, source: str = "template") -> str:
    """``text`` with every ``{{ name }}`` replaced by ``values[name]``.

    Raises TemplateError if a placeholder has no value, a value is unused, a value holds a line break, a
    double quote or braces, or braces remain after filling (a malformed placeholder such as ``{{ x``).
    """
    used = placeholders(text)
    problems = [f"{source}: no value for placeholder {{{{ {name} }}}}" for name in sorted(used - set(values))]
    problems += [f"{source}: value {name!r} fills no placeholder" for name in sorted(set(values) - used)]
    for name, value in sorted(values.items()):
        bad = [repr(token) for token in _FORBIDDEN_IN_VALUES if token in value]
        if bad:
            problems.append(f"{source}: value {name!r} contains {', '.join(bad)}")
    if problems:
        raise TemplateError("\n".join(problems))
    filled = PLACEHOLDER.sub(lambda match: values[match.group(1)], text)
    leftovers = [
        f"{source}:{number}: unfilled {line.strip()!r}"
        for number, line in enumerate(filled.splitlines(), start=1)
        if "{{" in line or "}}" in line
    ]
    if leftovers:
        raise TemplateError("\n".join(leftovers))
    return filled


def fill_tree(
    template_dir: Path, destination: Path, values: Mapping[str, str], staging_root: Path | None = None
) -> list[Path]:
    """Copy ``template_dir`` to ``destination`` (replacing it), filling every ``*.tmpl`` file.

    Every value must be used by at least one template file of the tree. The tree is written under
    ``staging_root`` (default: beside ``destination``; give one outside a model repository, which would
    otherwise see a half-written model) on the same filesystem, then renamed into place, the old tree moved
    aside first. Returns the written files. Raises TemplateError (nothing written) on any problem,
    FileNotFoundError without the template.
    """
    if not template_dir.is_dir():
        raise FileNotFoundError(f"template directory {template_dir} does not exist")
    files = sorted(path for path in template_dir.rglob("*") if path.is_file())
    texts = {path: path.read_text() for path in files if path.suffix == TEMPLATE_SUFFIX}
    used = set().union(*(placeholders(text) for text in texts.values())) if texts else set()
    problems = [f"{template_dir}: value {name!r} fills no placeholder" for name in sorted(set(values) - used)]
    rendered: dict[Path, str] = {}
    for path, text in texts.items():
        try:
            rendered[path] = fill(
                text, {k: v for k, v in values.items() if k in placeholders(text)}, source=str(path)
            )
        except TemplateError as exc:
            problems.append(str(exc))
    if problems:
        raise TemplateError("\n".join(problems))

    staging_root = destination.parent if staging_root is None else staging_root
    staging = staging_root / f".{destination.name}.filling"
    shutil.rmtree(staging, ignore_errors=True)
    written = []
    for path in files:
        relative = path.relative_to(template_dir)
        if path in rendered:
            relative = relative.with_suffix("")
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if path in rendered:
            target.write_text(rendered[path])
        else:
            shutil.copyfile(path, target)
        written.append(destination / relative)
    replace_tree(staging, destination)
    return written


def replace_tree(new: Path, destination: Path) -> None:
    """Put directory ``new`` at ``destination``: the old tree is renamed aside, then removed."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    old = new.with_name(f"{new.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        destination.rename(old)
    new.rename(destination)
    shutil.rmtree(old, ignore_errors=True)
