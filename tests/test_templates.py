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


def test_the_committed_generate_ensemble_is_its_template_filled():
    """`generate` and every `generate_merged_<id>` share one request contract: one template."""
    template = (TEMPLATES / "generate_ensemble" / "config.pbtxt.tmpl").read_text()
    assert placeholders(template) == {"description", "name", "token_model"}
    committed = (ROOT / "model_repository" / "generate" / "config.pbtxt").read_text()
    description = committed.splitlines()[0].removeprefix("# ")
    assert committed == fill(
        template, {"description": description, "name": "generate", "token_model": "adapter_lm"}
    )


def test_the_merged_token_model_has_the_contract_of_adapter_lm():
    """Same inputs and outputs, and the same batching and queue policy, line for line, as the bank's."""

    def contract(text: str) -> list[str]:
        lines = text.splitlines()
        start, output = lines.index("input ["), lines.index("output [")
        return lines[start : lines.index("]", output) + 1]

    def batching(text: str) -> list[str]:
        lines = text.splitlines()
        start = lines.index("dynamic_batching {")
        return lines[start : lines.index("}", start) + 1]

    template = (TEMPLATES / "merged_lm" / "config.pbtxt.tmpl").read_text()
    bank = (ROOT / "model_repository" / "adapter_lm" / "config.pbtxt").read_text()
    assert contract(template) == contract(bank)
    assert len(contract(bank)) == 15  # 7 inputs and 4 outputs in their brackets
    assert batching(template) == batching(bank)
    assert any("max_queue_size" in line for line in batching(bank))
