"""The committed demo model (models/demo): its accuracy table, reproduced offline from the weights.

The weights are loaded with transformers + PEFT only, never with the project's serving code, and greedy
answers are checked against the pure functions of training.tasks on a fixed subset of the held-out prompts
the committed table was measured on. Batching here differs from training.evaluate on purpose (fixed-size
batches in prompt order instead of length-sorted ones), so the table does not depend on how it was batched.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from training.data import ALPHABET, MAX_LEN, MIN_LEN, evaluation_prompts, is_held_out
from training.tasks import TASKS

BYTE_OFFSET = 4  # <pad> <bos> <eos> <sep>, then one token per byte
DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# The contract of issue 3: adapter id ("" is the base) -> task.
EXPECTED_TASKS = {"": "echo", "upper": "upper", "reverse": "reverse", "rot13": "rot13"}
TABLE_PROMPTS = 1000
SUBSET_STEP = 5  # every 5th prompt of the table: 200 per model
BATCH_SIZE = 50
BAR = 0.99


def _answers(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, prompts: list[str]) -> list[str]:
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), BATCH_SIZE):
            inputs = tokenizer(prompts[start : start + BATCH_SIZE], return_tensors="pt", padding=True)
            output = model.generate(**inputs, max_new_tokens=MAX_LEN + 1, do_sample=False)
            new_ids = output[:, inputs["input_ids"].shape[1] :]
            answers += tokenizer.batch_decode(new_ids, skip_special_tokens=True)
    return answers


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(DEMO / "base")


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return evaluation_prompts(TABLE_PROMPTS)[::SUBSET_STEP]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def dtype(request) -> str:
    """The table's columns: float32 as trained, bfloat16 as a GPU serves it (every weight cast)."""
    return request.param


@pytest.fixture(scope="module")
def answers(dtype, tokenizer, prompts) -> dict[str, list[str]]:
    """Greedy answers of the base ("") and of each adapter, each on a fresh copy of the base."""
    result = {}
    for adapter_id in EXPECTED_TASKS:
        model = LlamaForCausalLM.from_pretrained(DEMO / "base")
        if adapter_id:
            model = PeftModel.from_pretrained(model, DEMO / "adapters" / adapter_id)
        result[adapter_id] = _answers(model.to(getattr(torch, dtype)).eval(), tokenizer, prompts)
    return result


def test_tasks_manifest_names_every_adapter_and_its_task():
    manifest = json.loads((DEMO / "tasks.json").read_text())
    assert {adapter_id: entry["task"] for adapter_id, entry in manifest["tasks"].items()} == EXPECTED_TASKS
    assert all(entry["description"] for entry in manifest["tasks"].values())
    assert manifest["prompts"] == {"alphabet": ALPHABET, "min_length": MIN_LEN, "max_length": MAX_LEN}
    assert sorted(path.name for path in (DEMO / "adapters").iterdir()) == sorted(filter(None, EXPECTED_TASKS))


@pytest.mark.parametrize("adapter_id", sorted(filter(None, EXPECTED_TASKS)))
def test_adapters_are_peft_lora_with_nonzero_weights(adapter_id):
    adapter_dir = DEMO / "adapters" / adapter_id
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    lora_b = [tensor for name, tensor in weights.items() if ".lora_B." in name]
    assert lora_b, "no lora_B weights"
    assert all(tensor.abs().max() > 0 for tensor in lora_b), "an untrained (zero) lora_B"


def test_tokenizer_frames_the_prompt_and_decodes_bytes(tokenizer):
    text = "hello world"
    ids = tokenizer(text)["input_ids"]
    assert ids == [tokenizer.bos_token_id, *(BYTE_OFFSET + b for b in text.encode()), tokenizer.sep_token_id]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_prompts_are_held_out(prompts):
    assert len(prompts) == TABLE_PROMPTS // SUBSET_STEP
    assert all(is_held_out(prompt) for prompt in prompts)
    assert all(MIN_LEN <= len(prompt) <= MAX_LEN and set(prompt) <= set(ALPHABET) for prompt in prompts)


def test_models_answer_differently(answers, prompts):
    """Checked before accuracy: an adapter that left the base unchanged must not pass as a task."""
    for first, second in itertools.combinations(answers, 2):
        same = sum(a == b for a, b in zip(answers[first], answers[second], strict=True))
        assert same <= 0.05 * len(prompts), f"{first or '(base)'} and {second or '(base)'} agree {same} times"


@pytest.mark.parametrize("adapter_id", list(EXPECTED_TASKS))
def test_accuracy_table_is_reproduced(adapter_id, dtype, answers, prompts):
    oracle = TASKS[EXPECTED_TASKS[adapter_id]].apply
    misses = [
        (prompt, oracle(prompt), got)
        for prompt, got in zip(prompts, answers[adapter_id], strict=True)
        if got != oracle(prompt)
    ]
    assert len(misses) <= (1 - BAR) * len(prompts), misses

    table = json.loads((DEMO / "accuracy.json").read_text())
    row = next(row for row in table["rows"] if row["adapter_id"] == adapter_id)
    assert row["task"] == EXPECTED_TASKS[adapter_id]
    assert row[dtype]["total"] == TABLE_PROMPTS
    assert row[dtype]["accuracy"] >= BAR
