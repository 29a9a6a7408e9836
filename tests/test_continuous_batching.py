"""Continuous batching in-process: a request's answer does not depend on what else runs.

Sequences join a running batch at random steps, leave it when they stop or are cancelled, and are prefilled
in chunks, under random row limits and KV budgets; LoRA, bottleneck and base rows mix. Every greedy answer
must equal the model's own *uncached* greedy decoding (the whole sequence recomputed each token, by PEFT for
LoRA, AdapterHub for bottleneck adapters, the bare model for the base), and every seeded sampled answer must
equal the same request run alone.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from multiadapter.config import EngineConfig
from multiadapter.engine import Engine, GenerationRequest, GenerationResult
from multiadapter.scheduler import CANCELLED, LENGTH, STOP, Scheduler, SchedulerLimits, Sequence

from tests.adapterhub_factories import build_mixed_family, lora_reference_model
from tests.test_fidelity_adapterhub import PROMPTS, reference_logits

SCHEDULES = 10
SEEN: dict[int, tuple[SchedulerLimits, object]] = {}  # schedule -> (limits, Seen), for the coverage check


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_mixed_family("llama", tmp_path_factory.mktemp("cb_llama"))


@pytest.fixture(scope="module")
def engine(family):
    return Engine.load(
        EngineConfig(base_model=family.base_dir, adapter_dir=family.adapter_dir, queue_timeout_ms=0)
    )


@pytest.fixture(scope="module")
def lora_reference(family):
    return lora_reference_model(family)


@pytest.fixture(scope="module")
def uncached(family, lora_reference, engine):
    """Greedy tokens of (prompt, adapter, max_tokens) by a full uncached forward per token, memoised."""
    memo: dict[tuple[tuple[int, ...], str], list[int]] = {}

    def greedy(prompt: list[int], adapter_id: str, max_tokens: int) -> list[int]:
        key = (tuple(prompt), adapter_id)
        tokens = memo.setdefault(key, [])
        while len(tokens) < max_tokens and not (tokens and tokens[-1] in engine.eos_ids):
            ids = torch.tensor([[*prompt, *tokens]])
            ones = torch.ones_like(ids)
            positions = torch.arange(ids.shape[1])[None, :]
            logits = reference_logits(family, lora_reference, ids, ones, positions, adapter_id)
            tokens.append(int(logits[0, -1].argmax()))
        return tokens[:max_tokens]

    return greedy


@dataclass
class Planned:
    request: GenerationRequest
    arrival: int
    cancel_at: int | None
    seq: Sequence | None = None


def plan(rng: np.random.Generator, adapter_ids: list[str], count: int) -> list[Planned]:
    planned = []
    for _ in range(count):
        sampled = rng.random() < 0.25
        request = GenerationRequest(
            PROMPTS[int(rng.integers(len(PROMPTS)))],
            adapter_ids[int(rng.integers(len(adapter_ids)))],
            max_tokens=int(rng.integers(1, 13)),
            temperature=0.8 if sampled else None,
            top_k=20 if sampled else None,
            seed=int(rng.integers(1 << 30)) if sampled else None,
        )
        cancel_at = int(rng.integers(1, 20)) if rng.random() < 0.1 else None
        planned.append(Planned(request, int(rng.integers(0, 16)), cancel_at))
    return planned


@dataclass
class Seen:
    """What a schedule exercised."""

    most_rows: int = 0
    joined: int = 0  # rows admitted into a batch that was already running
    chunked: int = 0  # prefill steps that did not finish their group's prompts


def run(engine: Engine, limits: SchedulerLimits, planned: list[Planned]) -> Seen:
    """Drive a scheduler of its own on the engine's model: arrivals and cancellations at their steps."""
    scheduler = Scheduler(
        engine.model,
        engine.bank,
        eos_ids=engine.eos_ids,
        pad_id=engine.pad_id,
        device=engine.device,
        limits=limits,
    )
    step, seen = 0, Seen()
    while step < 200:
        for p in planned:
            if p.arrival == step:
                row, _ = engine.prepare(p.request)
                p.seq = scheduler.sequence(row)
                scheduler.add(p.seq)
            if p.cancel_at == step and p.seq is not None:
                p.seq.cancelled = True
        if step > max(p.arrival for p in planned) and not scheduler.has_work:
            return seen
        result = scheduler.step()
        seen.most_rows = max(seen.most_rows, result.rows)
        seen.joined += result.joined
        seen.chunked += int(result.prefill_rows > 0 and scheduler.prefilling is not None)
        step += 1
    pytest.fail("the schedule did not finish in 200 steps")


def alone(engine: Engine, request: GenerationRequest) -> list[int]:
    planned = [Planned(request, 0, None)]
    run(engine, SchedulerLimits(), planned)
    return planned[0].seq.tokens


def test_the_adapters_differ_under_the_uncached_oracle(family, uncached):
    # A zero adapter would pass every comparison below vacuously.
    answers = {a: tuple(uncached(PROMPTS[0], a, 8)) for a in ["", *family.lora_ids, *family.bottleneck_ids]}
    assert len(set(answers.values())) == len(answers), answers


@pytest.mark.parametrize("schedule", range(SCHEDULES))
def test_answers_do_not_depend_on_what_joins_or_leaves(engine, family, uncached, schedule):
    rng = np.random.default_rng(1000 + schedule)
    adapter_ids = ["", *family.lora_ids, *family.bottleneck_ids]
    limits = SchedulerLimits(
        max_rows=int(rng.choice([2, 3, 5, 16])),
        max_kv_tokens=int(rng.choice([30, 64, 10_000])),
        prefill_chunk=int(rng.choice([2, 3, 5, 512])),
    )
    planned = plan(rng, adapter_ids, 12)
    seen = run(engine, limits, planned)
    SEEN[schedule] = (limits, seen)
    assert seen.most_rows > 1, "the schedule never batched rows together"
    for p in planned:
        seq, request = p.seq, p.request
        assert seq is not None and seq.finished, p
        if request.temperature:
            assert seq.tokens == alone(engine, request)[: len(seq.tokens)], p
        else:
            reference = uncached(list(request.input_ids), request.adapter_id, request.max_tokens)
            assert seq.tokens == reference[: len(seq.tokens)], (p, limits)
        if seq.finish_reason == CANCELLED:
            assert p.cancel_at is not None
            continue
        assert len(seq.tokens) == request.max_tokens or seq.tokens[-1] in engine.eos_ids, p
        assert seq.finish_reason == (STOP if seq.tokens[-1] in engine.eos_ids else LENGTH)


def test_the_schedules_joined_running_batches_and_prefilled_in_chunks():
    assert len(SEEN) == SCHEDULES, "run the schedules first"
    assert sum(seen.joined for _, seen in SEEN.values()) >= SCHEDULES
    chunked = [seen.chunked for limits, seen in SEEN.values() if limits.prefill_chunk < 6]
    assert chunked and all(count > 0 for count in chunked)


def test_the_kv_budget_and_row_limit_hold_and_the_oldest_goes_first(engine, family):
    scheduler = Scheduler(
        engine.model,
        engine.bank,
        eos_ids=frozenset(),  # no early stop: every row holds its reservation to the end
        pad_id=engine.pad_id,
        device=engine.device,
        limits=SchedulerLimits(max_rows=3, max_kv_tokens=40, prefill_chunk=4),
    )
    seqs = []
    for prompt in PROMPTS[:6]:
        row, _ = engine.prepare(GenerationRequest(prompt, family.lora_ids[0], max_tokens=8))
        seqs.append(scheduler.sequence(row))
        scheduler.add(seqs[-1])
    admitted_order = []
    while scheduler.has_work:
        active = scheduler.active
        assert len(active) <= 3
        assert sum(s.reserved_tokens for s in active) <= 40
        admitted_order += [s for s in active if s not in admitted_order]
        scheduler.step()
    assert admitted_order == seqs  # first come, first served
    assert all(s.finish_reason == LENGTH and len(s.tokens) == 8 for s in seqs)


def test_the_loop_thread_serves_concurrent_submitters_exactly(engine, family, uncached):
    adapter_ids = ["", *family.lora_ids, *family.bottleneck_ids]
    requests = [
        GenerationRequest(PROMPTS[i % len(PROMPTS)], adapter_ids[i % len(adapter_ids)], max_tokens=3 + i % 7)
        for i in range(24)
    ]
    steps = check_concurrent_answers(engine, requests, uncached)
    assert steps < sum(r.max_tokens for r in requests)  # requests shared steps


def check_concurrent_answers(engine: Engine, requests: list[GenerationRequest], uncached) -> int:
    """Send each request from its own thread through the engine's loop, check every answer against the
    uncached oracle, and return the loop's steps."""
    outcomes: dict[int, object] = {}
    engine.start_loop()
    try:

        def send(i: int) -> None:
            (outcomes[i],) = engine.generate([requests[i]])

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        steps = engine.loop.steps
    finally:
        engine.stop_loop()
    assert sorted(outcomes) == list(range(len(requests)))
    for i, request in enumerate(requests):
        outcome = outcomes[i]
        assert isinstance(outcome, GenerationResult), outcome
        expected = uncached(list(request.input_ids), request.adapter_id, request.max_tokens)
        assert outcome.output_ids == expected, (i, request)
    return steps


def test_a_stopped_loop_answers_everything_it_holds_with_an_error(engine, family):
    engine.start_loop()
    loop = engine.loop
    finished: list[tuple[Sequence, Exception | None]] = []

    class Listener:
        def on_tokens(self, seq, tokens):
            pass

        def on_finish(self, seq, error):
            finished.append((seq, error))

    for prompt in PROMPTS[:5]:
        engine.submit(GenerationRequest(prompt, family.lora_ids[0], max_tokens=12), lambda entry: Listener())
    engine.stop_loop()
    engine.start_loop()
    try:
        assert engine.loop is not loop
    finally:
        engine.stop_loop()
    assert len(finished) == 5
    assert all(error is None or "unloaded" in str(error) for _, error in finished)
    late = []
    loop.submit(engine.scheduler.sequence(engine.prepare(GenerationRequest(PROMPTS[0]))[0]), Listener())
    late.append(finished[-1])
    assert late[0][1] is not None  # a stopped loop answers at once


def test_more_adapters_than_the_device_holds_still_answer_exactly(family, uncached):
    """Two bank slots for 5 adapters and the base, nothing preloaded: adapters load on first use, wait for
    a slot while others run, are evicted and loaded again, and every answer is still exact."""
    small = Engine.load(
        EngineConfig(
            base_model=family.base_dir, adapter_dir=family.adapter_dir, max_adapters=2, preload_adapters=()
        )
    )
    adapter_ids = ["", *family.lora_ids, *family.bottleneck_ids]
    assert len(adapter_ids) - 1 > small.bank.capacity
    requests = [
        GenerationRequest(PROMPTS[i % len(PROMPTS)], adapter_ids[i % len(adapter_ids)], max_tokens=3 + i % 7)
        for i in range(24)
    ]
    check_concurrent_answers(small, requests, uncached)
    assert small.adapters.evictions > 0 and small.adapters.loads >= len(adapter_ids) - 1
    assert len(small.bank) <= 2


def test_requests_waiting_for_an_adapter_load_are_bounded_and_time_out(family, monkeypatch):
    """A request whose adapter is loading waits outside the loop: at most max_waiting_requests of them (the
    rest UNAVAILABLE at once), and queue_timeout_ms counts the load's time too. The load itself is held back
    here by a gate in front of the real store."""
    from multiadapter.errors import Unavailable

    engine = Engine.load(
        EngineConfig(
            base_model=family.base_dir,
            adapter_dir=family.adapter_dir,
            preload_adapters=(),
            max_waiting_requests=2,
            queue_timeout_ms=300,
        )
    )
    engine.start_loop()
    gate = threading.Event()
    real_load = engine.adapters.store.load

    def gated_load(adapter_id):
        gate.wait(30)
        return real_load(adapter_id)

    monkeypatch.setattr(engine.adapters.store, "load", gated_load)
    finished: list[Exception | None] = []
    done = threading.Condition()

    class Listener:
        def on_tokens(self, seq, tokens):
            pass

        def on_finish(self, seq, error):
            with done:
                finished.append(error)
                done.notify_all()

    request = GenerationRequest(PROMPTS[0], family.lora_ids[0], max_tokens=2)
    try:
        for _ in range(3):
            engine.submit(request, lambda entry: Listener())
        assert len(finished) == 1 and isinstance(finished[0], Unavailable)  # the third, at once
        assert "wait for adapters to load" in str(finished[0])
        threading.Event().wait(0.6)  # longer than queue_timeout_ms
        gate.set()
        with done:
            assert done.wait_for(lambda: len(finished) == 3, timeout=30)
        assert all(isinstance(e, Unavailable) and "waited" in str(e) for e in finished[1:]), finished
        (answer,) = engine.generate([request])  # the adapter is resident now: served at once
        assert isinstance(answer, GenerationResult) and answer.adapter_id == family.lora_ids[0]
    finally:
        gate.set()
        engine.stop_loop()


def test_a_request_that_times_out_in_the_queue_answers_its_error_in_process(family):
    """Engine.generate stepping the scheduler itself (no loop thread): a request that waits longer than
    queue_timeout_ms answers UNAVAILABLE, never an empty result. Each forward pass is slowed to 20 ms, so
    the requests queued behind the single row wait at least 20 ms against a 1 ms timeout."""
    from multiadapter.errors import Unavailable

    engine = Engine.load(
        EngineConfig(
            base_model=family.base_dir, adapter_dir=family.adapter_dir, max_batch_rows=1, queue_timeout_ms=1
        )
    )
    hook = engine.model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    try:
        requests = [GenerationRequest(PROMPTS[i], family.lora_ids[0], max_tokens=2) for i in range(3)]
        first, *rest = engine.generate(requests)
    finally:
        hook.remove()
    assert isinstance(first, GenerationResult) and len(first.output_ids) == 2, first
    assert rest and all(isinstance(e, Unavailable) and "waited" in str(e) for e in rest), rest
