"""A quantized base (NF4, LLM.int8) against bf16 and fp32, in-process: memory and decode time, measured side
by side in one run (``python -m bench.quantized``, part of ``make bench``).

- Weight bytes: the base's linear layers (packed weights and their statistics) and the whole model in
  memory, for each of fp32, bf16, int8 and nf4 loads of the bench model (bench/fixture.py).
- Decode step: one new token per row over a KV cache of CACHE_TOKENS, every row on one LoRA adapter, at B = 1
  and 8; the four engines interleaved round by round (bench/timing.py), ratios over bf16 within each round.
  The bench model is small enough that Python overhead weighs in, so:
- One large linear layer, 4096 x 4096, alone: bitsandbytes' Linear4bit and Linear8bitLt against nn.Linear
  in bf16, for 1 and 8 tokens, interleaved the same way.
- Adapters in a memory budget: how many rank-16 all-linear LoRA adapters fit beside the base in a fixed
  budget (the bf16 model's bytes times BUDGET_OVER_BF16), counting each adapter in the dtype the bank keeps
  it in (float32 over a quantized base, as PEFT does, or bf16 with lora_dtype=bfloat16; bf16 over bf16).
  Beside it, the same arithmetic for a Llama-2-7B-shaped model in a 24 GiB budget (computed from the shapes,
  not measured).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from multiadapter.bank import BASE_SLOT
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine
from multiadapter.quantization import weight_bytes

from bench import outputs
from bench.fixture import BENCH_SPEC, QUICK_SPEC, build_fixture
from bench.machine import machine_info, usable_cores
from bench.timing import Budget, Progress, Workload, interleave, paired_ratio

LOADS = {
    "fp32": ("float32", "none"),
    "bf16": ("bfloat16", "none"),
    "int8": ("bfloat16", "int8"),
    "nf4": ("bfloat16", "nf4"),
}
CACHE_TOKENS = 64
BATCHES = (1, 8)
LARGE = 4096
BUDGET_OVER_BF16 = 1.5
# Llama-2-7B: 32 layers, hidden 4096, MLP 11008, vocab 32000; a rank-16 adapter on every linear layer.
LLAMA7B = dict(layers=32, hidden=4096, intermediate=11008, vocab=32000, rank=16, budget_gib=24)


@dataclass
class Measures:
    machine: dict
    spec: str
    bytes: dict  # load -> {"linear_quantized", "linear_full", "model"}
    decode: dict  # "B<n>" -> {load -> {"median_ms", "over_bf16", "q1", "q3"}}
    large: dict  # "T<n>" -> {kind -> {...}}
    budget: dict


def model_bytes(model: torch.nn.Module) -> int:
    """Every parameter and buffer of `model` as stored: linear weights as `weight_bytes` counts them (packed
    weights with their quantization statistics), everything else at its size."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if id(t) not in linear}
    return sum(t.numel() * t.element_size() for t in tensors.values()) + sum(weight_bytes(model).values())


def lora_bytes(engine: Engine, adapter_id: str) -> int:
    return next(e.nbytes for e in engine.bank.entries() if e.adapter_id == adapter_id)


def decode_steps(engines: dict[str, Engine], adapter_id: str, budget: Budget, progress: Progress) -> dict:
    out = {}
    for batch in BATCHES:
        progress.section(f"decode step: batch {batch}, KV cache {CACHE_TOKENS} tokens, adapter {adapter_id}")
        generator = torch.Generator().manual_seed(batch)
        context = torch.randint(3, 250, (batch, CACHE_TOKENS), generator=generator)
        step_ids = torch.randint(3, 250, (batch, 1), generator=generator)
        mask = torch.ones(batch, CACHE_TOKENS + 1, dtype=torch.long)
        positions = torch.full((batch, 1), CACHE_TOKENS, dtype=torch.long)
        with torch.inference_mode(), ExitStack() as stack:
            caches, workloads = {}, []
            for name, engine in engines.items():
                slot = next(e.slot for e in engine.bank.entries() if e.adapter_id == adapter_id)
                routing = stack.enter_context(engine.bank.routing([BASE_SLOT] * batch))
                routing.set_slots([slot] * batch)
                caches[name] = engine.model(
                    input_ids=context, attention_mask=torch.ones_like(context), use_cache=True
                ).past_key_values

                def step(
                    model=engine.model, cache=caches[name], ids=step_ids, mask=mask, positions=positions
                ):
                    return model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=positions,
                        past_key_values=cache,
                        use_cache=True,
                    ).logits

                workloads.append(
                    Workload(name, step, finish=lambda cache=caches[name]: cache.crop(CACHE_TOKENS))
                )
            samples = interleave(workloads, budget, progress, f"decode B={batch}")
        out[f"B{batch}"] = summarize(samples, engines)
    return out


def summarize(samples, names) -> dict:
    result = {}
    for name in names:
        ratio = paired_ratio(samples, name, "bf16")
        result[name] = {
            "median_ms": round(samples.median_ms(name), 3),
            "over_bf16": round(ratio.median, 3),
            "q1": round(ratio.q1, 3),
            "q3": round(ratio.q3, 3),
        }
    return result


def large_layer(budget: Budget, progress: Progress, size: int) -> dict:
    """One size x size linear layer: NF4 and int8 (bitsandbytes modules) against bf16 and fp32 nn.Linear."""
    import bitsandbytes as bnb

    weight = torch.randn(size, size, generator=torch.Generator().manual_seed(0)) * 0.02
    nf4 = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    nf4.weight = bnb.nn.Params4bit(weight.to(torch.bfloat16), requires_grad=False, quant_type="nf4")
    int8 = bnb.nn.Linear8bitLt(size, size, bias=False, has_fp16_weights=False, threshold=6.0)
    int8.weight = bnb.nn.Int8Params(weight.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    layers = {"nf4": nf4.to("cpu"), "int8": int8.to("cpu")}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        linear = torch.nn.Linear(size, size, bias=False, dtype=dtype)
        linear.weight.data.copy_(weight)
        layers[name] = linear
    out = {}
    with torch.inference_mode():
        for tokens in BATCHES:
            progress.section(f"one {size} x {size} linear layer, {tokens} token(s)")
            x = torch.randn(tokens, 1, size, generator=torch.Generator().manual_seed(tokens))
            inputs = {name: x.to(torch.float32 if name == "fp32" else torch.bfloat16) for name in layers}
            workloads = [
                Workload(name, lambda layer=layer, x=inputs[name]: layer(x)) for name, layer in layers.items()
            ]
            out[f"T{tokens}"] = summarize(
                interleave(workloads, budget, progress, f"linear T={tokens}"), layers
            )
            out[f"T{tokens}"]["weight_bytes"] = {
                name: sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
                for name, layer in layers.items()
            }
    return out


def adapters_in_budget(measured: dict, per_adapter: dict) -> dict:
    """How many adapters fit beside each base in BUDGET_OVER_BF16 x the bf16 model's bytes; and the same
    for a 7B-shaped model in 24 GiB (computed)."""
    budget = int(measured["bf16"]["model"] * BUDGET_OVER_BF16)
    fits = {name: max(0, (budget - measured[name]["model"]) // per_adapter[name]) for name in ("bf16", "nf4")}
    fits["nf4_bf16_lora"] = max(0, (budget - measured["nf4"]["model"]) // per_adapter["bf16"])
    c = LLAMA7B
    h, m, layers, r = c["hidden"], c["intermediate"], c["layers"], c["rank"]
    linear = layers * (4 * h * h + 3 * h * m)
    other = 2 * c["vocab"] * h  # embedding and head, kept in bf16
    nf4_base = linear // 2 + linear // 64 + 2 * other  # half a byte per weight, a byte of absmax per 64
    bf16_base = 2 * (linear + other)
    lora_params = layers * r * (4 * (h + h) + 2 * (h + m) + (m + h))
    room = c["budget_gib"] << 30
    return {
        "bench_model": {"budget_bytes": budget, "adapter_bytes": per_adapter, "adapters": fits},
        "llama7b_computed": {
            "budget_bytes": room,
            "base_bytes": {"bf16": bf16_base, "nf4": nf4_base},
            "adapter_bytes": {"bf16": 2 * lora_params, "nf4": 4 * lora_params},
            "adapters": {
                "bf16": (room - bf16_base) // (2 * lora_params),
                "nf4": (room - nf4_base) // (4 * lora_params),
                "nf4_bf16_lora": (room - nf4_base) // (2 * lora_params),
            },
        },
    }


def run(quick: bool, out: Path) -> Measures:
    progress = Progress()
    spec = QUICK_SPEC if quick else BENCH_SPEC
    fixture, _ = build_fixture(spec, out / ("model-quick" if quick else "model-bench"))
    engines = {}
    for name, (dtype, method) in LOADS.items():
        progress.section(f"loading the bench model: {name}")
        engines[name] = Engine.load(
            EngineConfig(
                base_model=fixture.base_model,
                adapter_dir=fixture.adapter_dir,
                dtype=dtype,
                quantization=method,
                preload_adapters=("a0",),
            )
        )
    measured = {
        name: {**weight_bytes(engine.model), "model": model_bytes(engine.model)}
        for name, engine in engines.items()
    }
    budget = Budget(warmup=1, min_rounds=3, max_rounds=5, seconds=2) if quick else Budget(2, 15, 60, 20)
    decode = decode_steps(engines, "a0", budget, progress)
    large = large_layer(budget, progress, 512 if quick else LARGE)
    per_adapter = {name: lora_bytes(engines[name], "a0") for name in ("bf16", "nf4")}
    return Measures(
        machine=machine_info(),
        spec="quick" if quick else "bench",
        bytes=measured,
        decode=decode,
        large=large,
        budget=adapters_in_budget(measured, per_adapter),
    )


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def report(m: Measures) -> str:
    machine = m.machine
    lines = [
        "# Quantized base (python -m bench.quantized)",
        "",
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('usable_cores', '?')} usable cores, torch "
        f"threads {machine.get('torch_threads', '?')}; model: {m.spec.upper()}_SPEC of bench/fixture.py.",
        "",
        "| load | linear weights (packed + statistics) | linear weights in full precision | whole model |",
        "|---|---|---|---|",
    ]
    for name, b in m.bytes.items():
        lines.append(f"| {name} | {_mib(b['quantized'])} | {_mib(b['full'])} | {_mib(b['model'])} |")
    lines += ["", "| decode step, one adapter | " + " | ".join(LOADS) + " |", "|---|" + "---|" * len(LOADS)]
    for key, row in m.decode.items():
        cells = [f"{row[n]['median_ms']:.2f} ms ({row[n]['over_bf16']:.2f}x)" for n in LOADS]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "| one linear layer | nf4 | int8 | bf16 | fp32 |", "|---|---|---|---|---|"]
    for key, row in m.large.items():
        cells = [
            f"{row[n]['median_ms']:.2f} ms ({row[n]['over_bf16']:.2f}x)"
            for n in ("nf4", "int8", "bf16", "fp32")
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
        weights = row["weight_bytes"]
        lines.append(
            "| weight bytes | " + " | ".join(_mib(weights[n]) for n in ("nf4", "int8", "bf16", "fp32")) + " |"
        )
    bench, llama = m.budget["bench_model"], m.budget["llama7b_computed"]
    lines += [
        "",
        f"Adapters beside the base in {_mib(bench['budget_bytes'])} ({BUDGET_OVER_BF16}x the bf16 model): "
        f"bf16 base {bench['adapters']['bf16']} (each {_mib(bench['adapter_bytes']['bf16'])}), nf4 base "
        f"{bench['adapters']['nf4']} (each {_mib(bench['adapter_bytes']['nf4'])}, float32), nf4 base with "
        f"lora_dtype=bfloat16 {bench['adapters']['nf4_bf16_lora']}.",
        f"Llama-2-7B shapes in {LLAMA7B['budget_gib']} GiB (computed): bf16 base "
        f"{llama['base_bytes']['bf16'] / (1 << 30):.1f} GiB leaves room for {llama['adapters']['bf16']} "
        f"rank-16 adapters of {_mib(llama['adapter_bytes']['bf16'])}; nf4 base "
        f"{llama['base_bytes']['nf4'] / (1 << 30):.1f} GiB for {llama['adapters']['nf4']} of "
        f"{_mib(llama['adapter_bytes']['nf4'])} (float32), or {llama['adapters']['nf4_bf16_lora']} with "
        "lora_dtype=bfloat16.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = outputs.parser(
        "python -m bench.quantized", __doc__, "the small model and few rounds (a smoke run)"
    )
    parser.add_argument("--threads", type=int, default=usable_cores(), help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    measures = run(args.quick, args.out)
    outputs.write(args.out, "quantized", report(measures), asdict(measures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
