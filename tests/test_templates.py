"""The template filler behind the generated model directories, and the templates themselves."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT
from tools.templates import TemplateError, fill, fill_tree, placeholders

TEMPLATES = ROOT / "tools" / "repository_templates"


def test_fill_replaces_every_placeholder():
    assert fill('name: "{{ name }}" # {{name}} again', {"name": "merged_upper"}) == (
        'name: "merged_upper" # merged_upper again'
    )


def test_fill_refuses_missing_and_unused_values_naming_them_all():
    with pytest.raises(TemplateError) as caught:
        fill("{{ a }} {{ b }}", {"a": "1", "c": "3"}, source="t.pbtxt")
    message = str(caught.value)
    assert "t.pbtxt: no value for placeholder {{ b }}" in message
    assert "t.pbtxt: value 'c' fills no placeholder" in message


@pytest.mark.parametrize("text", ["{{ a }} {{ b", "{{ a }} }}", "{{ 1bad }} {{ a }}", "{{a-b}} {{ a }}"])
def test_fill_refuses_anything_left_unfilled(text):
    with pytest.raises(TemplateError, match="unfilled"):
        fill(text, {"a": "x"})


@pytest.mark.parametrize("value", ['say "hi"', "two\nlines", "{{ a }}", "x}}"])
def test_fill_refuses_values_that_would_change_the_structure(value):
    with pytest.raises(TemplateError, match="contains"):
        fill('key: "{{ a }}"', {"a": value})


def test_fill_tree_writes_everything_or_nothing(tmp_path):
    template = tmp_path / "template"
    (template / "1").mkdir(parents=True)
    (template / "config.pbtxt.tmpl").write_text('name: "{{ name }}"\n')
    (template / "1" / "model.py.tmpl").write_text("# {{ note }}\n")
    (template / "1" / ".gitkeep").write_text("")
    out = tmp_path / "out" / "merged_x"

    with pytest.raises(TemplateError, match="no value for placeholder"):
        fill_tree(template, out, {"name": "merged_x"})
    assert not out.exists() and not list((tmp_path / "out").glob(".*"))

    written = fill_tree(template, out, {"name": "merged_x", "note": "hello"})
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "1/.gitkeep",
        "1/model.py",
        "config.pbtxt",
    ]
    assert (out / "config.pbtxt").read_text() == 'name: "merged_x"\n'
    assert (out / "1" / "model.py").read_text() == "# hello\n"

    with pytest.raises(TemplateError, match="'extra' fills no placeholder"):
        fill_tree(template, out, {"name": "merged_x", "note": "hello", "extra": "1"})
    assert (out / "config.pbtxt").read_text() == 'name: "merged_x"\n'  # the earlier fill is intact


def _block(text: str, first: str) -> list[str]:
    """The lines from `first` to the first line that closes it ("]" or "}")."""
    lines = text.splitlines()
    start = lines.index(first)
    closing = "]" if first.endswith("[") else "}"
    return lines[start : lines.index(closing, start) + 1]


def test_every_merged_ensemble_has_the_contract_of_generate():
    """`generate` and every `generate_merged_<id>` take the same inputs and give the same outputs."""
    template = (TEMPLATES / "generate_ensemble" / "config.pbtxt.tmpl").read_text()
    assert placeholders(template) == {"description", "name", "token_model"}
    generate = (ROOT / "model_repository" / "generate" / "config.pbtxt").read_text()
    for block in ("input [", "output ["):
        assert _block(template, block) == _block(generate, block)
    assert len(_block(generate, "input [")) == 10  # 8 inputs in their brackets


def test_generate_stream_takes_the_contract_of_generate_plus_stream_and_finish_reason():
    stream = (ROOT / "model_repository" / "generate_stream" / "config.pbtxt").read_text()
    generate = (ROOT / "model_repository" / "generate" / "config.pbtxt").read_text()
    inputs, outputs = _block(stream, "input ["), _block(stream, "output [")
    assert [line.rstrip(",") for line in inputs if "stream" not in line] == [
        line.rstrip(",") for line in _block(generate, "input [")
    ]
    assert [line.rstrip(",") for line in outputs if "finish_reason" not in line] == [
        line.rstrip(",") for line in _block(generate, "output [")
    ]
    assert "model_transaction_policy { decoupled: true }" in stream


def test_the_merged_token_model_has_the_batching_and_queue_policy_of_the_engine():
    """Line for line, the same dynamic batching and queue policy as `generate_stream`, the bank's engine."""
    template = (TEMPLATES / "merged_lm" / "config.pbtxt.tmpl").read_text()
    engine = (ROOT / "model_repository" / "generate_stream" / "config.pbtxt").read_text()
    assert _block(template, "dynamic_batching {") == _block(engine, "dynamic_batching {")
    assert any("max_queue_size" in line for line in _block(engine, "dynamic_batching {"))
