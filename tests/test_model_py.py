"""The Triton translation layers (`model.py`) against the typed fake of triton_python_backend_utils."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from tests import fake_triton
from tests.conftest import ROOT

REPO = ROOT / "model_repository"


@pytest.fixture(scope="module", params=["continuous", "request"])
def lm(tiny_model, request):
    """generate_stream's model.py (the engine's host) with each batching mode: answered later by the engine
    loop, or generated to the end inside execute()."""
    with fake_triton.installed() as pb:
        model_cls = fake_triton.load_model_py(REPO / "generate_stream" / "1" / "model.py")
        model = model_cls()
        params = {
            "base_model": str(tiny_model.base_model),
            "adapter_dir": str(tiny_model.adapter_dir),
            "batching": request.param,
        }
        model.initialize(fake_triton.initialize_args(REPO / "generate_stream" / "config.pbtxt", params))
        yield model, pb
        model.finalize()


def sent_until_final(model, requests) -> list[list]:
    """Every response each request got, once each has its final one (and no more come)."""
    assert model.execute(requests) is None  # decoupled: everything goes through the response senders
    deadline = time.monotonic() + 60
    while not all(r.get_response_sender().final for r in requests):
        assert time.monotonic() < deadline, "a request was never answered"
        time.sleep(0.01)
    time.sleep(0.05)  # a response after the final one would raise in the fake sender now
    return [[response for response, _ in r.get_response_sender().sent] for r in requests]


def answers(model, requests) -> list:
    """The one final response of each request (requests sent with stream false)."""
    responses = []
    for sent in sent_until_final(model, requests):
        assert len(sent) == 1, sent
        responses.append(sent[0])
    return responses


ONE_ANSWER = np.array([[False]], dtype=np.bool_)


def test_one_response_per_request_in_order_with_typed_errors(lm, tiny_model):
    model, pb = lm
    adapter = tiny_model.adapter_ids[0]
    requests = [
        fake_triton.request(
            text_input="hi", adapter_id=adapter, max_tokens=np.array([[3]], np.int32), stream=ONE_ANSWER
        ),
        fake_triton.request(text_input="hi", adapter_id="missing", stream=ONE_ANSWER),
        fake_triton.request(
            text_input="hi", adapter_id="", max_tokens=np.array([[1, 2]], np.int32), stream=ONE_ANSWER
        ),
        fake_triton.request(text_input="hi", adapter_id="", stream=ONE_ANSWER),
    ]
    responses = answers(model, requests)
    assert not responses[0].has_error()
    assert 1 <= responses[0].output("generated_tokens")[0, 0] <= 3
    assert responses[0].output("served_adapter_id")[0, 0] == adapter.encode()
    assert responses[0].output("adapter_version")[0, 0].startswith(b"sha256:")
    assert responses[0].output("finish_reason")[0, 0] in (b"stop", b"length")
    assert responses[1].error().code() == pb.TritonError.NOT_FOUND
    # Triton 2.51 streams errors without their code: the message carries it.
    assert responses[1].error().message().startswith("[NOT_FOUND] adapter 'missing'")
    assert responses[2].error().code() == pb.TritonError.INVALID_ARG
    assert "exactly one element" in responses[2].error().message()
    assert not responses[3].has_error() and responses[3].output("adapter_version")[0, 0] == b""
    batches = {
        m.labels["composition"]: m.value
        for m in pb.MetricFamily.families["multiadapter_batches_total"].metrics
    }
    assert batches["mixed"] >= 1  # the adapter row and the base row shared a batch
    errors = {
        m.labels["code"]: m.value
        for m in pb.MetricFamily.families["multiadapter_request_errors_total"].metrics
    }
    assert errors["NOT_FOUND"] >= 1 and errors["INVALID_ARG"] >= 1


def test_streamed_deltas_join_to_the_one_answer(lm, tiny_model):
    """Many responses, only the last one final and with a finish reason; their text joins to the answer
    the same request gets in one response (request-level batching answers once either way)."""
    model, _ = lm
    adapter = tiny_model.adapter_ids[1]
    prompts = ["héllo", "a longer prompt €", "x"]
    single = answers(
        model, [fake_triton.request(text_input=p, adapter_id=adapter, stream=ONE_ANSWER) for p in prompts]
    )
    streamed = sent_until_final(
        model, [fake_triton.request(text_input=p, adapter_id=adapter) for p in prompts]
    )
    for one, responses in zip(single, streamed, strict=True):
        assert not one.has_error() and not any(r.has_error() for r in responses)
        text = "".join(r.output("text_output")[0, 0].decode("utf-8") for r in responses)
        assert text == one.output("text_output")[0, 0].decode("utf-8")
        assert [r.output("finish_reason")[0, 0] for r in responses[:-1]] == [b""] * (len(responses) - 1)
        assert responses[-1].output("finish_reason")[0, 0] == one.output("finish_reason")[0, 0]
        assert responses[-1].output("generated_tokens")[0, 0] == one.output("generated_tokens")[0, 0]
        if model.engine.loop is not None:
            assert len(responses) > 1  # streamed as it was generated


def test_a_cancelled_client_frees_its_row_and_gets_cancelled(lm):
    model, pb = lm
    if model.engine.loop is None:
        pytest.skip("request-level batching generates each batch to its end inside execute()")
    request = fake_triton.request(
        text_input="cancel me", adapter_id="", max_tokens=np.array([[500]], np.int32)
    )
    assert model.execute([request]) is None
    sender = request.get_response_sender()
    deadline = time.monotonic() + 30
    while not sender.sent:  # the first delta: it is running
        assert time.monotonic() < deadline
        time.sleep(0.005)
    sender.cancelled = True
    while not sender.final:
        assert time.monotonic() < deadline, "the cancelled request was never answered"
        time.sleep(0.01)
    last = sender.sent[-1][0]
    assert last.error().code() == pb.TritonError.CANCELLED
    assert last.output_tensors() == [] and "cancelled after" in last.error().message()
    assert model.engine.loop.pending == (0, 0)  # its row is free


def test_a_model_wide_failure_still_answers_every_request_once(lm, monkeypatch):
    model, pb = lm

    def explode(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(model.engine, "generate", explode)
    monkeypatch.setattr(model.engine.scheduler, "step", explode)
    responses = answers(
        model,
        [
            fake_triton.request(text_input="x", adapter_id="", stream=ONE_ANSWER),
            fake_triton.request(text_input="x", stream=ONE_ANSWER),
        ],
    )
    assert [r.error().code() for r in responses] == [pb.TritonError.INTERNAL, pb.TritonError.INVALID_ARG]
    assert "device lost" in responses[0].error().message()
    assert "adapter_id is required" in responses[1].error().message()


def test_tokenizer_and_detokenizer_round_trip(tiny_model):
    with fake_triton.installed() as pb:
        params = {"base_model": str(tiny_model.base_model)}
        tok = fake_triton.load_model_py(REPO / "tokenizer" / "1" / "model.py")()
        tok.initialize(fake_triton.initialize_args(REPO / "tokenizer" / "config.pbtxt", params))
        detok = fake_triton.load_model_py(REPO / "detokenizer" / "1" / "model.py")()
        detok.initialize(fake_triton.initialize_args(REPO / "detokenizer" / "config.pbtxt", params))
        out = tok.execute([fake_triton.request(text_input="héllo"), fake_triton.request(text_input=b"\xc3")])
        assert out[1].error().code() == pb.TritonError.INVALID_ARG
        token_ids = out[0].output("input_ids")
        (back,) = detok.execute([fake_triton.request(output_ids=token_ids)])
        assert back.output("text_output")[0, 0].decode() == "héllo"


def test_the_tokenizer_steps_never_import_torch_and_the_front_not_even_transformers(tiny_model):
    """They start in a second without it, which is most of what a restarted server waits for."""
    script = f"""
import sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "backend_src")!r}]
from tests import fake_triton
base = {{"base_model": {str(tiny_model.base_model)!r}}}
with fake_triton.installed():
    directory = fake_triton.ROOT / "model_repository" / "generate"
    front = fake_triton.load_model_py(directory / "1" / "model.py")()
    front.initialize(fake_triton.initialize_args(directory / "config.pbtxt", {{}}))
    front_light = "transformers" not in sys.modules and "torch" not in sys.modules
    for name in ("tokenizer", "detokenizer"):
        directory = fake_triton.ROOT / "model_repository" / name
        model = fake_triton.load_model_py(directory / "1" / "model.py")()
        model.initialize(fake_triton.initialize_args(directory / "config.pbtxt", base))
import os
print(front_light, "torch" in sys.modules, os.environ.get("USE_TORCH"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # nothing inherits USE_TORCH
    assert result.stdout.strip() == "True False None", result.stdout + result.stderr


def test_loop_metrics_reach_triton_in_batches_and_exactly_when_idle(monkeypatch):
    """Each metric update is a round trip to Triton: busy steps are summed, and sent when the loop idles."""
    from multiadapter.scheduler import StepResult

    with fake_triton.installed() as pb:
        from triton_boundary import ServingMetrics

        metrics = ServingMetrics("m")
        family = pb.MetricFamily.families

        def value(name: str, **labels: str) -> float:
            return sum(m.value for m in family[name].metrics if labels.items() <= m.labels.items())

        monkeypatch.setattr(ServingMetrics, "FLUSH_INTERVAL_S", 3600.0)
        metrics._flushed_at = time.monotonic()  # noqa: SLF001  (a flush just happened)
        for _ in range(5):
            metrics.record_step(StepResult(rows=3, adapters=2), waiting=1, running=3)
        assert value("multiadapter_engine_steps_total") == 0  # busy: held back
        metrics.record_step(StepResult(rows=1, adapters=1), waiting=0, running=0)
        assert value("multiadapter_engine_steps_total") == 6
        assert value("multiadapter_batches_total", composition="mixed") == 5
        assert value("multiadapter_batches_total", composition="uniform") == 1
        assert value("multiadapter_batch_rows_total") == 16
        assert value("multiadapter_engine_requests", state="running") == 0
