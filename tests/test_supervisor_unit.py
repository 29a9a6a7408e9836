"""The supervisor's pure parts: stub table parsing, fault and stall detection as tables of transitions, the
stand-in configuration, metrics parsing, and the stand-in model against the typed Triton fake."""

from __future__ import annotations

import json

import pytest

from server.model_control import ModelProgress, parse_progress
from server.stubs import Stub, parse_stub_cmdline, remove_shm_regions
from server.supervisor import STANDIN_SOURCE, HealthPolicy, StallWatch, StubWatch, standin_config
from tests import fake_triton

STUB_ARGV = [
    "/x/backends/python/triton_python_backend_stub",
    "/repo/adapter_lm/1/model.py",
    "triton_python_backend_shm_region_a26198f5",
    "1048576",
    "1048576",
    "2258",
    "/x/backends/python",
    "336",
    "adapter_lm_0_0",
    "DEFAULT",
]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (STUB_ARGV, ("adapter_lm", "adapter_lm_0_0", "triton_python_backend_shm_region_a26198f5")),
        ([*STUB_ARGV[:8], "generate_merged_up_1_3", "DEFAULT"], ("generate_merged_up", None, None)),
        ([*STUB_ARGV[:8], "AUTOCOMPLETE_STUB", "DEFAULT"], None),  # auto-complete stubs are transient
        (["/usr/bin/python3", *STUB_ARGV[1:]], None),
        (STUB_ARGV[:5], None),
    ],
)
def test_parse_stub_cmdline(argv, expected):
    stub = parse_stub_cmdline(42, argv, "sleeping")
    if expected is None:
        assert stub is None
        return
    model, instance, region = expected
    assert stub is not None and stub.model == model and stub.pid == 42
    if instance:
        assert (stub.instance, stub.shm_region) == (instance, region)


def stub(pid: int, status: str = "sleeping", model: str = "adapter_lm") -> Stub:
    return Stub(pid, model, f"{model}_0_0", f"region_{pid}", status)


def run_polls(polls, loaded=True):
    """Feed StubWatch a sequence of (running stubs, {pid: status of the ones not running}); the faults of
    each poll as (pid, reason) lists."""
    watch = StubWatch()
    seen = []
    for running, others in polls:
        faults = watch.poll(
            running, status_of=lambda pid, others=others: others.get(pid, "dead"), is_loaded=lambda m: loaded
        )
        seen.append([(f.stub.pid, f.reason) for f in faults])
    return watch, seen


def test_an_exited_stub_is_reported_once_after_two_polls():
    _, seen = run_polls(
        [
            ([stub(1), stub(2, model="tokenizer")], {}),
            ([stub(2, model="tokenizer")], {1: "zombie"}),  # first sight: suspect only
            ([stub(2, model="tokenizer")], {1: "zombie"}),  # second: reported
            ([stub(2, model="tokenizer")], {1: "zombie"}),  # never twice
        ]
    )
    assert seen == [[], [], [(1, "exited")], []]


def test_a_stub_reaped_by_triton_with_nothing_in_its_place_is_reported():
    _, seen = run_polls([([stub(1)], {}), ([], {}), ([], {}), ([], {})])
    assert seen == [[], [], [(1, "exited")], []]


def test_a_stub_unloaded_with_its_model_is_no_fault():
    watch, seen = run_polls([([stub(1)], {}), ([], {1: "zombie"}), ([], {}), ([], {})], loaded=False)
    assert seen == [[], [], [], []]
    assert watch.known == {}


def test_a_stub_replaced_by_a_reload_is_no_fault():
    watch, seen = run_polls([([stub(1)], {}), ([stub(1), stub(2)], {}), ([stub(2)], {}), ([stub(2)], {})])
    assert seen == [[], [], [], []]
    assert list(watch.known) == [2]


def test_a_stopped_stub_is_reported_and_a_resumed_one_is_not():
    _, seen = run_polls(
        [
            ([stub(1)], {}),
            ([stub(1, "stopped")], {}),
            ([stub(1, "running")], {}),  # SIGCONT before the second poll: no fault
            ([stub(1, "stopped")], {}),
            ([stub(1, "stopped")], {}),
        ]
    )
    assert seen == [[], [], [], [], [(1, "stopped")]]


def test_a_handled_stub_is_never_reported_and_its_region_is_listed_until_reaped():
    watch = StubWatch()
    watch.poll([stub(1), stub(2, model="tokenizer")])
    watch.mark_handled(1)
    for _ in range(3):
        assert watch.poll([stub(2, model="tokenizer")], status_of=lambda pid: "zombie") == []
    assert watch.regions_of_dead() == ["region_1"]
    assert watch.stubs_of("adapter_lm") == []
    assert [s.pid for s in watch.stubs_of("tokenizer")] == [2]
    watch.poll([stub(2, model="tokenizer")], status_of=lambda pid: "dead")
    assert watch.regions_of_dead() == []


@pytest.mark.parametrize(
    ("samples", "stalled_at"),
    [
        # (time, pending, executions) per observation; the times at which the model is reported hung
        ([(0, 1, 5), (2, 1, 5), (4, 1, 5), (5, 1, 5)], [4]),
        ([(0, 1, 5), (2, 1, 6), (4, 1, 7), (6, 1, 8)], []),  # busy but progressing
        ([(0, 0, 5), (5, 0, 5), (10, 0, 5)], []),  # idle
        ([(0, 1, 5), (3, 0, 5), (4, 1, 5), (7, 1, 5), (8, 1, 5)], [8]),  # the clock restarts when idle
        ([(0, 1, 5), (4, 1, 5), (6, 1, 5), (8, 1, 5)], [4, 8]),  # reported again after another timeout
    ],
)
def test_stall_watch(samples, stalled_at):
    watch = StallWatch(hang_timeout_s=4)
    reported = [
        t for t, pending, done in samples if watch.observe({"m": ModelProgress(pending, done)}, t) == ["m"]
    ]
    assert reported == stalled_at


def test_parse_progress_sums_versions_and_ignores_other_series():
    text = "\n".join(
        [
            "# HELP nv_inference_exec_count Number of model executions performed",
            "# TYPE nv_inference_exec_count counter",
            'nv_inference_exec_count{model="adapter_lm",version="1"} 19',
            'nv_inference_exec_count{model="adapter_lm",version="2"} 1',
            'nv_inference_exec_count{model="tokenizer",version="1"} 7',
            "# HELP nv_inference_pending_request_count Instantaneous number of pending requests",
            "# TYPE nv_inference_pending_request_count gauge",
            'nv_inference_pending_request_count{model="adapter_lm",version="1"} 3',
            "# TYPE nv_inference_count counter",
            'nv_inference_count{model="adapter_lm",version="1"} 100',
            "# TYPE multiadapter_engine_steps_total counter",
            'multiadapter_engine_steps_total{model="adapter_lm"} 400',
            "# TYPE multiadapter_engine_requests gauge",
            'multiadapter_engine_requests{model="adapter_lm",state="waiting"} 2',
            'multiadapter_engine_requests{model="adapter_lm",state="running"} 5',
            "",
        ]
    )
    assert parse_progress(text) == {
        "adapter_lm": ModelProgress(pending=3 + 2 + 5, executions=20 + 400, answers_later=True),
        "tokenizer": ModelProgress(pending=0, executions=7),
    }


def test_standin_config_keeps_the_contract_and_runs_on_one_cpu_instance():
    config = {
        "name": "adapter_lm",
        "backend": "python",
        "max_batch_size": 16,
        "input": [{"name": "input_ids"}],
        "output": [{"name": "output_ids"}],
        "dynamic_batching": {"max_queue_delay_microseconds": 5000},
        "instance_group": [{"name": "adapter_lm_0", "kind": "KIND_GPU", "count": 2, "gpus": [0]}],
        "parameters": {"base_model": {"string_value": "/m"}},
    }
    standin = standin_config(config, "restarting")
    assert standin["instance_group"] == [{"count": 1, "kind": "KIND_CPU"}]
    for key in ("name", "backend", "max_batch_size", "input", "output", "dynamic_batching"):
        assert standin[key] == config[key]
    assert standin["parameters"]["standin_message"] == {"string_value": "restarting"}
    assert config["parameters"] == {"base_model": {"string_value": "/m"}}  # the original is untouched


@pytest.mark.parametrize("decoupled", [False, True])
def test_the_standin_answers_every_request_unavailable_with_its_message(tmp_path, decoupled):
    config = {
        "name": "adapter_lm",
        "parameters": {"standin_message": {"string_value": "model 'adapter_lm' is being restarted"}},
        "model_transaction_policy": {"decoupled": decoupled},
    }
    with fake_triton.installed() as pb:
        model = fake_triton.load_model_py(STANDIN_SOURCE)()
        model.initialize({"model_config": json.dumps(config)})
        requests = [fake_triton.request(input_ids=[[1, 2]]) for _ in range(3)]
        returned = model.execute(requests)
        if decoupled:
            assert returned is None
            sent = [r.get_response_sender().sent for r in requests]
            assert all(len(s) == 1 and s[0][1] == pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL for s in sent)
            responses = [s[0][0] for s in sent]
        else:
            responses = returned
    assert len(responses) == 3
    for response in responses:
        assert response.error().code() == pb.TritonError.UNAVAILABLE
        assert response.error().message() == "model 'adapter_lm' is being restarted"


def test_health_policy_problems():
    assert HealthPolicy().problems() == []
    assert len(HealthPolicy(poll_s=0, hang_timeout_s=-1, canary_failures_before_restart=0).problems()) == 3


def test_remove_shm_regions_only_removes_plain_names_that_exist(tmp_path):
    (tmp_path / "triton_python_backend_shm_region_1").write_bytes(b"x")
    outside = tmp_path.parent / "keep_me"
    outside.write_bytes(b"x")
    removed = remove_shm_regions(
        ["triton_python_backend_shm_region_1", "triton_python_backend_shm_region_2", "../keep_me", ""],
        shm_dir=tmp_path,
    )
    assert removed == ["triton_python_backend_shm_region_1"]
    assert outside.exists()
