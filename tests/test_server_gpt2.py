"""A GPT-2-family base (Conv1D layers, fused qkv) served by the real tritonserver, checked against PEFT."""

from __future__ import annotations

import pytest
import torch

from client import AdapterClient, GenerateRequest, GenerateResult
from tests.conftest import ROOT
from tests.peft_factories import build_adapter

ADAPTERS = {
    "qkv": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "mlp_rs": dict(
        r=16, lora_alpha=8, use_rslora=True, target_modules=["c_fc", "mlp.c_proj"], fan_in_fan_out=True
    ),
}
PROMPTS = ["hello", "gpt two", "conv1d layers", "fused qkv", "x", "mixed batch of adapters"]


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tools.tiny_model import build_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        initializer_range=0.1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    for i, (adapter_id, spec) in enumerate(ADAPTERS.items()):
        build_adapter(root / "base", root / "adapters" / adapter_id, seed=50 + i, **spec)
    return root, tokenizer


@pytest.fixture(scope="module")
def gpt2_server(gpt2_family, tmp_path_factory):
    from server.process import start_server

    root, _ = gpt2_family
    log_path = tmp_path_factory.mktemp("triton-gpt2") / "tritonserver.log"
    server = start_server(
        ROOT / "model_repository", root / "base", root / "adapters", log_path=log_path, ready_timeout_s=600
    )
    yield server
    server.stop()


def peft_answer(root, tokenizer, prompt: str, adapter_id: str, max_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(root / "base")
    if adapter_id:
        model = PeftModel.from_pretrained(model, root / "adapters" / adapter_id)
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            input_ids=ids["input_ids"],
            attention_mask=ids["attention_mask"],
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_gpt2_mixed_burst_over_grpc_matches_peft(gpt2_family, gpt2_server):
    root, tokenizer = gpt2_family
    ids = [*ADAPTERS, ""]
    requests = [GenerateRequest(p, a, max_tokens=10) for p in PROMPTS for a in ids]
    expected = {
        (r.text, r.adapter_id): peft_answer(root, tokenizer, r.text, r.adapter_id, 10) for r in requests
    }
    for prompt in ("hello", "fused qkv"):
        answers = [expected[(prompt, a)] for a in ids]
        assert len(set(answers)) == len(ids), f"adapters agree on {prompt!r}: {answers}"
    with AdapterClient(gpt2_server.grpc_url, protocol="grpc", timeout_s=120) as client:
        outcomes = client.generate_many(requests, concurrency=12)
    for request, outcome in zip(requests, outcomes, strict=True):
        assert isinstance(outcome, GenerateResult), outcome
        assert outcome.text == expected[(request.text, request.adapter_id)], request
        assert outcome.adapter_id == request.adapter_id
