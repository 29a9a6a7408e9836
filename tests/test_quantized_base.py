"""A quantized base (NF4 and LLM.int8, bitsandbytes on the CPU) under the adapter bank, against PEFT over
the same quantized load.

The base is a small Llama saved in bf16; the adapters are PEFT LoRA adapters made over its quantized load
(three with random weights of several ranks and targets, one trained a few steps as QLoRA). The truth is
PEFT's *uncached* forward over the same quantized base. Tolerances, over many prompts:

- LOGIT_TOL: largest absolute logit difference over every real position of a mixed batch (LoRA rows of
  every adapter and base rows). Both sides compute the quantized layers with the same kernel; the LoRA delta
  is float32 on both, but ours keeps ranks padded to the bank's largest and the scale folded into B, so a
  float32 sum may round differently and flip a bf16 output by an ulp or two (0.0156 at |logit| 2-4).
- BOTTLENECK_TOL: bottleneck rows against AdapterHub over the same quantized load, both in bf16 (AdapterHub's
  adapter weights cast to bf16, as the engine keeps them), as a share of the largest |logit|. The two round
  the adapter's sums in different orders and that compounds over the layers: measured 0.6-1.6%; an adapter's
  own effect is asserted to be far larger.
- BF16_LORA_TOL, BF16_LORA_AGREEMENT: with lora_dtype=bfloat16 the adapters' weights and deltas are rounded
  to bf16 while PEFT keeps them in float32. Most logits stay within a few ulps but a rare position moves by
  more (measured: median 0, 99th percentile 0.2% of the largest |logit|, maximum 12%), so the 99th percentile
  is bounded (2^-6 of the largest |logit|), and greedy answers must agree on 90% of the prompts (96% here).
- GREEDY_AGREEMENT: the share of 100 prompts per adapter whose greedy answer (the engine's, batched, mixed,
  with its KV cache) equals PEFT's uncached greedy answer. bf16 batches may round differently from one
  row, so this is a share, not every prompt.
"""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest, GenerationResult
from multiadapter.errors import ConfigError
from multiadapter.quantization import is_quantized, weight_bytes

from tests.peft_factories import peft_logits
from tests.quantized_factories import EOS, peft_over_quantized, random_prompts

LOGIT_TOL = 0.0625
BOTTLENECK_TOL = 2**-5  # of the largest |logit|
BF16_LORA_TOL = 2**-6  # of the largest |logit|, for the 99th percentile of the errors
BF16_LORA_AGREEMENT = 0.9
GREEDY_AGREEMENT = 0.95
PROMPTS_PER_ADAPTER = 100
MAX_TOKENS = 6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from tests.quantized_factories import build_base

    return build_base(tmp_path_factory.mktemp("quantized") / "base")


@pytest.fixture(scope="module", params=["nf4", "int8"])
def family(request, base_dir):
    from tests.quantized_factories import QuantizedFamily, build_adapters

    method = request.param
    adapter_dir = base_dir.parent / f"adapters_{method}"
    ids = build_adapters(base_dir, adapter_dir, method)
    return QuantizedFamily(method, base_dir, adapter_dir, ids)


@pytest.fixture(scope="module")
def engine(family):
    return Engine.load(
        EngineConfig(
            base_model=family.base_dir,
            adapter_dir=family.adapter_dir,
            quantization=family.method,
            queue_timeout_ms=0,
        )
    )


@pytest.fixture(scope="module")
def reference(family):
    return peft_over_quantized(family)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPTS_PER_ADAPTER, seed=13)


def peft_uncached_greedy(reference, prompts, adapter_id, max_tokens, device="cpu"):
    """Greedy answers by PEFT's full forward of the whole sequence for every token (no KV cache), prompts of
    one length batched together (no padding)."""
    answers: dict[int, list[int]] = {}
    by_length = defaultdict(list)
    for i, prompt in enumerate(prompts):
        by_length[len(prompt)].append(i)
    for indices in by_length.values():
        ids = torch.tensor([prompts[i] for i in indices], device=device)
        done = torch.zeros(len(indices), dtype=torch.bool)
        outputs = [[] for _ in indices]
        for _ in range(max_tokens):
            with torch.no_grad():
                logits = reference(
                    input_ids=ids, adapter_names=[adapter_id or "__base__"] * len(indices)
                ).logits
            nxt = logits[:, -1].float().argmax(-1)
            for row, token in enumerate(nxt.tolist()):
                if not done[row]:
                    outputs[row].append(token)
                    done[row] = token == EOS
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        answers.update(zip(indices, outputs, strict=True))
    return [answers[i] for i in range(len(prompts))]


def mixed_greedy_agreement(engine, reference, prompts, ids, device="cpu") -> float:
    """The share of `prompts` (prompt i on adapter ids[i], all in one mixed run through the engine) whose
    greedy answer equals PEFT's uncached greedy answer for that prompt and adapter."""
    requests = [GenerationRequest(p, a, max_tokens=MAX_TOKENS) for p, a in zip(prompts, ids, strict=True)]
    outcomes = engine.generate(requests)
    truth = {}
    for adapter_id in dict.fromkeys(ids):
        rows = [i for i, a in enumerate(ids) if a == adapter_id]
        answers = peft_uncached_greedy(reference, [prompts[i] for i in rows], adapter_id, MAX_TOKENS, device)
        truth.update(zip(rows, answers, strict=True))
    return sum(o.output_ids == truth[i] for i, o in enumerate(outcomes)) / len(prompts)


def test_the_base_is_really_quantized_and_has_no_full_precision_copy(engine, family):
    """Every linear layer but the output head holds packed integers (NF4: half a byte per weight, plus its
    block statistics; int8: one byte), and no float tensor of a quantized layer's weight shape exists."""
    model = engine.model
    quantized = {n.removesuffix(".base"): m for n, m in model.named_modules() if is_quantized(m)}
    assert set(quantized) == set(engine.quantized.quantized) and len(quantized) == 14
    assert set(engine.quantized.kept) == {"lm_head"}
    weights = sum(m.in_features * m.out_features for m in quantized.values())
    packed = sum(m.weight.numel() * m.weight.element_size() for m in quantized.values())
    per_weight = 0.5 if family.method == "nf4" else 1.0
    assert packed == weights * per_weight
    stored = weight_bytes(model)["quantized"]
    # Statistics: NF4 one byte of absmax per 64 weights (double quantization) plus 1 KiB codebooks per
    # layer; int8 one float32 scale per output row.
    assert packed < stored <= packed * 1.07 + 2048 * len(quantized)
    shapes = {(m.out_features, m.in_features) for m in quantized.values()}
    floats = [
        (name, tuple(t.shape))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and tuple(t.shape) in shapes
    ]
    assert floats == [], floats


def test_lora_weights_are_float32_over_the_quantized_base(engine):
    banked = [m for m in engine.model.modules() if hasattr(m, "a_t") and m.a_t.numel()]
    assert banked and all(m.quantized and m.a_t.dtype == torch.float32 for m in banked)
    assert engine.dtype == torch.bfloat16


def test_the_adapters_differ_over_the_quantized_base(reference, family, prompts):
    from multiadapter.generation import left_pad

    batch = left_pad(prompts[:16], 0, torch.device("cpu"))
    outs = {a: peft_logits(reference, batch, [a] * 16) for a in [*family.adapter_ids, ""]}
    base = outs.pop("")
    for adapter_id, logits in outs.items():
        assert (logits - base).abs().max() > 0.5, adapter_id


def test_mixed_batch_logits_match_peft_over_the_same_quantized_base(engine, reference, family, prompts):
    cycle = [*family.adapter_ids, ""]
    ids = [cycle[i % len(cycle)] for i in range(len(prompts))]
    ours, batch = engine.logits(prompts, ids)
    theirs = peft_logits(reference, batch, ids)
    real = batch.attention_mask.bool()
    error = (ours.to(torch.float32)[real] - theirs[real]).abs().max().item()
    assert error <= LOGIT_TOL, error


def test_greedy_answers_agree_with_pefts_uncached_forward_over_many_prompts(
    engine, reference, family, prompts
):
    """100 prompts per adapter (and the bare base), all in one mixed run through the engine's loop."""
    cycle = [*family.adapter_ids, ""]
    requests = [GenerationRequest(p, a, max_tokens=MAX_TOKENS) for a in cycle for p in prompts]
    outcomes = engine.generate(requests)
    assert all(isinstance(o, GenerationResult) for o in outcomes)
    by_adapter = {}
    for k, adapter_id in enumerate(cycle):
        ours = [o.output_ids for o in outcomes[k * len(prompts) : (k + 1) * len(prompts)]]
        truth = peft_uncached_greedy(reference, prompts, adapter_id, MAX_TOKENS)
        agreed = sum(o == t for o, t in zip(ours, truth, strict=True))
        by_adapter[adapter_id or "base"] = (agreed, truth)
    distinct = {tuple(map(tuple, truth)) for _, truth in by_adapter.values()}
    assert len(distinct) == len(cycle)  # every adapter answers differently (else agreement says little)
    shares = {a: agreed / len(prompts) for a, (agreed, _) in by_adapter.items()}
    assert all(share >= GREEDY_AGREEMENT for share in shares.values()), shares


def test_adapter_version_and_listing_name_the_quantization(engine, family):
    tag = f"+{family.method}"
    (lora,) = engine.generate([GenerationRequest([1, 105, 106], family.adapter_ids[0], max_tokens=2)])
    (base,) = engine.generate([GenerationRequest([1, 105, 106], "", max_tokens=2)])
    assert lora.adapter_version.startswith("sha256:") and lora.adapter_version.endswith(tag)
    assert base.adapter_version == tag
    listing = engine.listing()
    assert listing["base"]["quantization"] == family.method
    assert listing["base"]["unquantized_layers"] == {"lm_head": "the output head"}
    assert family.method in listing["base"]["description"]
    assert all(row["version"].endswith(tag) for row in listing["adapters"] if row["version"])


def test_a_layer_named_in_quantization_skip_stays_unquantized(family):
    if family.method != "nf4":
        pytest.skip("one method is enough")
    engine = Engine.load(
        EngineConfig(
            base_model=family.base_dir,
            adapter_dir=family.adapter_dir,
            quantization="nf4",
            quantization_skip=("model.layers.0.self_attn.q_proj",),
        )
    )
    layer = engine.model.get_submodule("model.layers.0.self_attn.q_proj")
    layer = getattr(layer, "base", layer)
    assert not is_quantized(layer) and layer.weight.dtype == torch.bfloat16
    assert engine.quantized.kept["model.layers.0.self_attn.q_proj"] == "named in quantization_skip"
    assert is_quantized(getattr(engine.model.get_submodule("model.layers.1.self_attn.q_proj"), "base", None))
    (answer,) = engine.generate([GenerationRequest([1, 105, 106], family.adapter_ids[0], max_tokens=2)])
    assert isinstance(answer, GenerationResult) and len(answer.output_ids) == 2


def test_bad_quantization_settings_fail_the_load_with_the_setting_named(family, tmp_path):
    if family.method != "nf4":
        pytest.skip("one method is enough")
    with pytest.raises(ConfigError, match="quantization must be one of"):
        EngineConfig.from_parameters({"base_model": str(family.base_dir), "quantization": "fp8"}, env={})
    with pytest.raises(ConfigError, match="'model.layers.9.mlp.up_proj', which is not a linear layer"):
        Engine.load(
            EngineConfig(
                base_model=family.base_dir,
                quantization="nf4",
                quantization_skip=("model.layers.9.mlp.up_proj",),
            )
        )
    # A checkpoint quantized already (here declared GPTQ) is refused, whatever the setting.
    gptq = tmp_path / "gptq"
    shutil.copytree(family.base_dir, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    for method in ("none", "nf4"):
        with pytest.raises(ConfigError, match="already quantized \\(quant_method='gptq'\\)"):
            Engine.load(EngineConfig(base_model=gptq, quantization=method))


def test_a_merged_variant_refuses_quantization_and_ignores_the_launchers(family, tmp_path):
    from multiadapter.merged_variant import MERGED_INFO_FILE

    if family.method != "nf4":
        pytest.skip("one method is enough")
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / MERGED_INFO_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="a merged-weight variant is not quantized"):
        EngineConfig.from_parameters({"merged_model": str(merged), "quantization": "nf4"}, env={})
    config = EngineConfig.from_parameters(
        {"merged_model": str(merged)}, env={"MULTIADAPTER_QUANTIZATION": "nf4"}
    )
    assert config.quantization == "none"
    bank = EngineConfig.from_parameters(
        {"base_model": str(family.base_dir)}, env={"MULTIADAPTER_QUANTIZATION": "int8"}
    )
    assert bank.quantization == "int8"


def test_bottleneck_adapters_over_the_quantized_base_match_adapterhub(family, tmp_path):
    """Bottleneck adapters (sequential and parallel) beside a QLoRA adapter and the base in one batch, each
    row against its library over the same quantized load: AdapterHub, PEFT, the bare model."""
    from multiadapter.generation import Batch

    from tests.quantized_factories import TRAINED, adapterhub_over_quantized, build_bottleneck_adapters

    store = tmp_path / "adapters"
    bottlenecks = build_bottleneck_adapters(family.base_dir, store)
    shutil.copytree(family.adapter_dir / TRAINED, store / TRAINED)
    engine = Engine.load(
        EngineConfig(
            base_model=family.base_dir, adapter_dir=store, quantization=family.method, queue_timeout_ms=0
        )
    )
    assert engine.refused == {}
    hub = adapterhub_over_quantized(family.base_dir, family.method, store, bottlenecks)
    lora = peft_over_quantized(family)
    prompts = random_prompts(16, seed=5)
    cycle = [*bottlenecks, TRAINED, ""]
    ids = [cycle[i % len(cycle)] for i in range(len(prompts))]
    ours, batch = engine.logits(prompts, ids)

    def hub_logits(adapter_id, sub):
        hub.set_active_adapters(adapter_id or None)
        with torch.no_grad():
            return hub(
                input_ids=sub.input_ids, attention_mask=sub.attention_mask, position_ids=sub.position_ids
            ).logits.to(torch.float32)

    for adapter_id in cycle:
        # The reference sees this adapter's rows padded as in the engine's batch (a different padding width
        # would change bf16 rounding by more than the comparison is about).
        rows = [i for i, a in enumerate(ids) if a == adapter_id]
        sub = Batch(batch.input_ids[rows], batch.attention_mask[rows], batch.position_ids[rows])
        if adapter_id == TRAINED:
            theirs = peft_logits(lora, sub, [adapter_id] * len(rows))
        else:
            theirs = hub_logits(adapter_id, sub)
        real = sub.attention_mask.bool()
        spread = theirs[real].abs().max()
        assert (ours[rows].to(torch.float32)[real] - theirs[real]).abs().max() <= BOTTLENECK_TOL * spread, (
            adapter_id
        )
        if adapter_id:  # the adapter's own effect on these rows dwarfs the tolerance
            effect = (theirs - hub_logits("", sub))[real].abs().max()
            assert effect > 4 * BOTTLENECK_TOL * spread, (adapter_id, effect)


def test_the_server_serves_mixed_concurrent_requests_over_nf4_like_peft(family, reference, tmp_path_factory):
    """`make serve QUANTIZE=nf4`, through the launcher's setting: the real tritonserver answers concurrent
    requests for every adapter and the base, over HTTP and gRPC, like PEFT's uncached greedy forward over
    the same NF4 load; answers name the quantization, and so does the adapters listing."""
    from multiadapter.tokenization import TextCodec

    from client import AdapterClient, GenerateRequest, GenerateResult
    from server.process import start_server
    from tests.conftest import ROOT
    from tests.quantized_factories import LETTERS

    if family.method != "nf4":
        pytest.skip("the server runs once, with nf4")
    codec = TextCodec.load(family.base_dir)
    prompts = random_prompts(60, seed=21)
    cycle = [*family.adapter_ids, ""]
    ids = [cycle[i % len(cycle)] for i in range(len(prompts))]
    texts = ["".join(chr(t - 4) for t in p[1:-1]) for p in prompts]
    assert all(codec.encode(t.encode()) == p for t, p in zip(texts, prompts, strict=True))
    truth = {}
    for adapter_id in cycle:
        rows = [i for i, a in enumerate(ids) if a == adapter_id]
        answers = peft_uncached_greedy(reference, [prompts[i] for i in rows], adapter_id, MAX_TOKENS)
        truth.update({i: codec.decode(answer) for i, answer in zip(rows, answers, strict=True)})
    assert all(set(truth[i]) <= {chr(t - 4) for t in LETTERS} for i in truth)  # letters: real answers
    log_dir = tmp_path_factory.mktemp("triton-nf4")
    server = start_server(
        ROOT / "model_repository",
        family.base_dir,
        family.adapter_dir,
        log_path=log_dir / "tritonserver.log",
        ready_timeout_s=600,
        engine_settings={"quantization": "nf4"},
    )
    try:
        agreed = {}
        for protocol, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            requests = [GenerateRequest(t, a, max_tokens=MAX_TOKENS) for t, a in zip(texts, ids, strict=True)]
            with AdapterClient(url, protocol=protocol, timeout_s=120) as client:
                outcomes = client.generate_many(requests, concurrency=12)
                listing = client.adapters()
            assert all(isinstance(o, GenerateResult) for o in outcomes), outcomes
            assert all(
                o.adapter_id == a and o.adapter_version.endswith("+nf4")
                for o, a in zip(outcomes, ids, strict=True)
            )
            agreed[protocol] = sum(o.text == truth[i] for i, o in enumerate(outcomes)) / len(outcomes)
            assert listing["base"]["quantization"] == "nf4", listing["base"]
        assert all(share >= GREEDY_AGREEMENT for share in agreed.values()), agreed
    finally:
        server.stop()
    log = (log_dir / "tritonserver.log").read_text(errors="replace")
    assert "nf4 (bitsandbytes" in log  # the start-up log names the base's quantization


def test_bf16_lora_weights_over_nf4_halve_the_adapter_bytes_and_stay_close_to_peft(
    family, engine, reference, prompts
):
    """lora_dtype=bfloat16 keeps adapters in bf16 over the quantized base (twice as many fit a budget), at
    bf16 rounding of the delta: against PEFT's float32 adapters within the BF16_LORA_* bounds."""
    if family.method != "nf4":
        pytest.skip("one method is enough")
    half = Engine.load(
        EngineConfig(
            base_model=family.base_dir,
            adapter_dir=family.adapter_dir,
            quantization="nf4",
            lora_dtype="bfloat16",
            queue_timeout_ms=0,
        )
    )
    sizes = {e.adapter_id: e.nbytes for e in half.bank.entries()}
    assert sizes and all(2 * sizes[e.adapter_id] == e.nbytes for e in engine.bank.entries())
    banked = [m for m in half.model.modules() if hasattr(m, "a_t") and m.a_t.numel()]
    assert banked and all(m.a_t.dtype == torch.bfloat16 for m in banked)
    cycle = [*family.adapter_ids, ""]
    ids = [cycle[i % len(cycle)] for i in range(len(prompts))]
    ours, batch = half.logits(prompts, ids)
    theirs = peft_logits(reference, batch, ids)
    real = batch.attention_mask.bool()
    errors = (ours.to(torch.float32)[real] - theirs[real]).abs().flatten()
    assert errors.quantile(0.99) <= BF16_LORA_TOL * theirs[real].abs().max(), errors.quantile(0.99)
    agreed = mixed_greedy_agreement(half, reference, prompts, ids)
    assert agreed >= BF16_LORA_AGREEMENT, agreed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")
def test_on_cuda_the_quantized_base_answers_like_peft_over_the_same_load(family, prompts):
    """The same checks on CUDA (bitsandbytes' GPU kernels): mixed-batch logits against PEFT over the same
    quantized load on the GPU, greedy answers against its uncached forward, the weights packed on the GPU."""
    device = "cuda"
    engine = Engine.load(
        EngineConfig(
            base_model=family.base_dir,
            adapter_dir=family.adapter_dir,
            quantization=family.method,
            queue_timeout_ms=0,
        ),
        device,
    )
    quantized = [m for m in engine.model.modules() if is_quantized(m)]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    reference = peft_over_quantized(family, device)
    cycle = [*family.adapter_ids, ""]
    ids = [cycle[i % len(cycle)] for i in range(len(prompts))]
    ours, batch = engine.logits(prompts, ids)
    theirs = peft_logits(reference, batch, ids, device)
    real = batch.attention_mask.bool().to(device)
    error = (ours.to(torch.float32)[real] - theirs[real]).abs().max().item()
    assert error <= LOGIT_TOL, error
    agreed = mixed_greedy_agreement(engine, reference, prompts, ids, device)
    assert agreed >= GREEDY_AGREEMENT, agreed


def test_a_kernel_the_device_cannot_run_fails_the_load_not_the_first_request(family, monkeypatch):
    """Stands in for a bitsandbytes build without this device's kernels (no GPU here): the load's one-token
    check forward fails, and the load says which setting on which device, with the kernel's error."""
    import bitsandbytes

    if family.method != "nf4":
        pytest.skip("one method is enough")

    def no_kernel(*args, **kwargs):
        raise RuntimeError("no kernel image is available for execution on the device")

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", no_kernel)
    with pytest.raises(ConfigError, match="nf4 cannot run on cpu: RuntimeError: no kernel image"):
        Engine.load(
            EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, quantization="nf4")
        )


def test_gpt2_conv1d_layers_quantize_and_serve_fan_in_fan_out_adapters(family, tmp_path):
    """GPT-2's Conv1D layers become Linear4bit; a PEFT adapter saved with fan_in_fan_out over that load is
    served like PEFT serves it, and really changes the answer."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.quantized_factories import load_quantized

    if family.method != "nf4":
        pytest.skip("one method is enough")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=260, n_embd=128, n_layer=2, n_head=4, n_positions=128, eos_token_id=2)
    GPT2LMHeadModel(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    spec = LoraConfig(
        r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False
    )
    made = get_peft_model(load_quantized(tmp_path / "base", "nf4"), spec)
    made.save_pretrained(tmp_path / "adapters" / "gpt2_lora")
    engine = Engine.load(
        EngineConfig(base_model=tmp_path / "base", adapter_dir=tmp_path / "adapters", quantization="nf4")
    )
    assert engine.refused == {} and engine.quantized.kept == {"lm_head": "the output head"}
    reference = PeftModel.from_pretrained(
        load_quantized(tmp_path / "base", "nf4"),
        tmp_path / "adapters" / "gpt2_lora",
        adapter_name="gpt2_lora",
    ).eval()
    ids = ["gpt2_lora", "", "gpt2_lora"]
    ours, batch = engine.logits(random_prompts(3, seed=8), ids)
    theirs = peft_logits(reference, batch, ids)
    real = batch.attention_mask.bool()
    assert (ours.to(torch.float32)[real] - theirs[real]).abs().max() <= LOGIT_TOL
    with torch.no_grad():
        bare = peft_logits(reference, batch, [""] * 3)
    assert (theirs[0] - bare[0])[real[0]].abs().max() > 0.1  # the adapter acts
