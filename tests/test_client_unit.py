"""Fast tests of the client: error-code table, request tensors, statistics, CLI parsing and output.

Real tritonclient objects throughout; the only "server" is a closed loopback port.
"""

from __future__ import annotations

import hashlib
import pickle
import shlex
import socket

import grpc
import numpy as np
import pytest
import tritonclient.grpc
import tritonclient.http
from geventhttpclient.response import HTTPConnectionClosed
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, triton_to_np_dtype

from client import (
    AdapterClient,
    GenerateRequest,
    GenerateResult,
    RequestFailed,
    build_inputs,
    cli,
    error_code,
)
from client.api import DEFAULT_URLS, OPTIONAL_INPUTS, normalize_statistics

MODULES = [pytest.param(tritonclient.http, id="http"), pytest.param(tritonclient.grpc, id="grpc")]


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Statuses as tritonclient 2.73 reports them for Python-backend TritonError codes from tritonserver 2.51.
@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("404", "NOT_FOUND"),
        ("400", "INVALID_ARG"),
        ("503", "UNAVAILABLE"),
        ("500", "INTERNAL"),
        ("501", "UNSUPPORTED"),
        ("StatusCode.NOT_FOUND", "NOT_FOUND"),
        ("StatusCode.INVALID_ARGUMENT", "INVALID_ARG"),
        ("StatusCode.UNAVAILABLE", "UNAVAILABLE"),
        ("StatusCode.INTERNAL", "INTERNAL"),
        ("StatusCode.UNKNOWN", "UNKNOWN"),
        ("StatusCode.UNIMPLEMENTED", "UNSUPPORTED"),
        ("StatusCode.ALREADY_EXISTS", "ALREADY_EXISTS"),
        ("StatusCode.CANCELLED", "CANCELLED"),
        ("StatusCode.DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED"),
        ("504", "DEADLINE_EXCEEDED"),
        (None, "UNKNOWN"),
        ("", "UNKNOWN"),
        ("418", "UNKNOWN"),
        ("StatusCode.OK", "UNKNOWN"),
        ("NOT_FOUND", "UNKNOWN"),
    ],
)
def test_error_code_table(status: str | None, code: str) -> None:
    assert error_code(status) == code


@pytest.mark.parametrize("grpc_code", [c for c in grpc.StatusCode if c not in (grpc.StatusCode.OK,)])
def test_every_grpc_error_status_has_a_code(grpc_code: grpc.StatusCode) -> None:
    # tritonclient.grpc builds the status as str(rpc_error.code()).
    mapped = error_code(str(grpc_code))
    assert mapped != "UNKNOWN" or grpc_code is grpc.StatusCode.UNKNOWN


@pytest.mark.parametrize(
    ("raised", "code"),
    [
        (InferenceServerException("no such adapter", status="404"), "NOT_FOUND"),
        (InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"), "INVALID_ARG"),
        (InferenceServerException("client-side", status=None), "UNKNOWN"),
        (TimeoutError("timed out"), "DEADLINE_EXCEEDED"),
        (ConnectionRefusedError(111, "Connection refused"), "UNAVAILABLE"),
        (HTTPConnectionClosed("connection closed."), "UNAVAILABLE"),  # a server that went away mid-answer
    ],
)
def test_failures_boundary_maps_each_exception(raised: BaseException, code: str) -> None:
    """The one place where tritonclient and socket exceptions become RequestFailed."""
    with AdapterClient("localhost:1") as client, pytest.raises(RequestFailed) as info, client._failures():
        raise raised
    assert info.value.code == code
    if isinstance(raised, InferenceServerException):
        assert (info.value.status, info.value.message) == (raised.status(), raised.message())
    else:
        assert info.value.status is None
        assert "localhost:1" in info.value.message


def test_request_failed_reads_and_pickles() -> None:
    failure = RequestFailed("NOT_FOUND", "adapter 'x' is not registered", "404")
    assert str(failure) == "NOT_FOUND: adapter 'x' is not registered"
    copy = pickle.loads(pickle.dumps(failure))
    assert (copy.code, copy.message, copy.status) == ("NOT_FOUND", failure.message, "404")


def _sent(infer_input: object) -> np.ndarray:
    """The array a real tritonclient InferInput will put on the wire."""
    if isinstance(infer_input, tritonclient.http.InferInput):
        raw = infer_input._get_binary_data()
    else:
        raw = infer_input._get_content()
    dtype = triton_to_np_dtype(infer_input.datatype())
    flat = deserialize_bytes_tensor(raw) if dtype == np.object_ else np.frombuffer(raw, dtype=dtype)
    return flat.reshape(infer_input.shape())


@pytest.mark.parametrize("module", MODULES)
def test_build_inputs_minimal_request_sends_only_required_tensors(module) -> None:
    inputs = build_inputs(GenerateRequest("héllo"), module)
    assert all(isinstance(i, module.InferInput) for i in inputs)
    assert [(i.name(), i.datatype(), list(i.shape())) for i in inputs] == [
        ("text_input", "BYTES", [1, 1]),
        ("adapter_id", "BYTES", [1, 1]),
    ]
    assert _sent(inputs[0]).tolist() == [["héllo".encode()]]
    assert _sent(inputs[1]).tolist() == [[b""]]


@pytest.mark.parametrize("module", MODULES)
def test_build_inputs_full_request_dtypes_and_values(module) -> None:
    request = GenerateRequest(
        b"\xff\xfe not utf-8", "alpha", max_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=2**40
    )
    inputs = {i.name(): i for i in build_inputs(request, module)}
    expected = {
        "text_input": ("BYTES", b"\xff\xfe not utf-8"),
        "adapter_id": ("BYTES", b"alpha"),
        "max_tokens": ("INT32", 7),
        "temperature": ("FP32", 0.5),
        "top_p": ("FP32", np.float32(0.9)),
        "top_k": ("INT32", 40),
        "seed": ("INT64", 2**40),
    }
    assert set(inputs) == set(expected)
    for name, (datatype, value) in expected.items():
        assert inputs[name].datatype() == datatype, name
        assert list(inputs[name].shape()) == [1, 1], name
        assert _sent(inputs[name]).tolist() == [[value]], name


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("field", [name for name, _ in OPTIONAL_INPUTS])
def test_build_inputs_each_optional_input_only_when_set(module, field: str) -> None:
    value = 0.0 if field in ("temperature", "top_p") else 0  # falsy values are still "set"
    names = [i.name() for i in build_inputs(GenerateRequest("x", **{field: value}), module)]
    assert names == ["text_input", "adapter_id", field]


@pytest.mark.parametrize(
    ("kwargs", "problems"),
    [
        ({"text": None}, ["text must be str or bytes"]),
        ({"text": "x", "adapter_id": 3}, ["adapter_id must be str or bytes"]),
        ({"text": "x", "max_tokens": True}, ["max_tokens must be an int"]),
        ({"text": "x", "max_tokens": 1.5}, ["max_tokens must be an int"]),
        ({"text": "x", "top_k": 2**31}, ["top_k=2147483648 does not fit int32"]),
        ({"text": "x", "seed": 2**63}, ["seed=9223372036854775808 does not fit int64"]),
        ({"text": "x", "temperature": "hot"}, ["temperature must be a number"]),
        ({"text": 1, "top_p": None, "max_tokens": "5"}, ["text must", "max_tokens must"]),
    ],
)
def test_generate_request_rejects_unsendable_values(kwargs: dict, problems: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        GenerateRequest(**kwargs)
    for problem in problems:
        assert problem in str(info.value)


def test_generate_request_accepts_out_of_contract_but_sendable_values() -> None:
    # The server, not the client, decides that these are bad: tests must be able to send them.
    GenerateRequest("", "../x", max_tokens=-1, temperature=-1.0, top_p=2.0, top_k=-5, seed=-(2**63))


HTTP_STATS = {
    "model_stats": [
        {
            "name": "generate",
            "version": "1",
            "inference_count": 9,
            "execution_count": 4,
            "inference_stats": {
                "success": {"count": 9, "ns": 900},
                "fail": {"count": 0, "ns": 0},
                "queue": {"count": 9, "ns": 90},
                "cache_hit": {"count": 0, "ns": 0},
            },
            "batch_stats": [
                {"batch_size": 1, "compute_infer": {"count": 2, "ns": 20}},
                {"batch_size": 4, "compute_infer": {"count": 1, "ns": 40}},
                {"batch_size": 3, "compute_infer": {"count": 1, "ns": 30}},
            ],
        },
        {"name": "other", "version": "1", "inference_count": 100, "execution_count": 100},
    ]
}
# The same numbers as tritonclient.grpc's as_json gives them: int64 as strings, zero fields omitted.
GRPC_STATS = {
    "model_stats": [
        {
            "name": "generate",
            "version": "1",
            "inference_count": "9",
            "execution_count": "4",
            "inference_stats": {
                "success": {"count": "9", "ns": "900"},
                "fail": {},
                "queue": {"count": "9", "ns": "90"},
                "cache_hit": {},
            },
            "batch_stats": [
                {"batch_size": "1", "compute_infer": {"count": "2", "ns": "20"}},
                {"batch_size": "4", "compute_infer": {"count": "1", "ns": "40"}},
                {"batch_size": "3", "compute_infer": {"count": "1", "ns": "30"}},
            ],
        },
    ]
}


@pytest.mark.parametrize("raw", [HTTP_STATS, GRPC_STATS], ids=["http", "grpc"])
def test_normalize_statistics_same_for_both_protocols(raw: dict) -> None:
    stats = normalize_statistics(raw, "generate")
    assert stats["inference_count"] == 9
    assert stats["execution_count"] == 4
    assert (stats["success_count"], stats["success_ns"]) == (9, 900)
    assert (stats["fail_count"], stats["queue_ns"], stats["compute_output_count"]) == (0, 90, 0)
    assert stats["batch_executions"] == {1: 2, 3: 1, 4: 1}
    assert all(type(v) is int for k, v in stats.items() if k != "batch_executions")


def test_normalize_statistics_sums_versions_and_ignores_other_models() -> None:
    raw = {"model_stats": HTTP_STATS["model_stats"] + [{**HTTP_STATS["model_stats"][0], "version": "2"}]}
    stats = normalize_statistics(raw, "generate")
    assert (stats["inference_count"], stats["batch_executions"][1]) == (18, 4)
    assert normalize_statistics({"model_stats": []}, "generate")["inference_count"] == 0


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_defaults_and_argument_checks(protocol: str) -> None:
    with AdapterClient(protocol=protocol) as client:
        assert (client.url, client.model) == (DEFAULT_URLS[protocol], "generate")
        with pytest.raises(ValueError, match="concurrency"):
            client.generate_many([GenerateRequest("x")], concurrency=0)
        assert client.generate_many([], concurrency=4) == []
    with pytest.raises(RuntimeError, match="closed"):
        client.generate(GenerateRequest("x"))
    with pytest.raises(ValueError, match="protocol"):
        AdapterClient(protocol="websocket")
    with pytest.raises(ValueError, match="scheme"):
        AdapterClient("http://localhost:8000", protocol=protocol)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_gives_one_unavailable_outcome_per_request(
    protocol: str, closed_port: int
) -> None:
    requests = [GenerateRequest(f"t{i}", adapter_id=f"a{i}") for i in range(5)]
    with AdapterClient(f"127.0.0.1:{closed_port}", protocol=protocol, timeout_s=5.0) as client:
        assert not client.is_ready()
        assert str(closed_port) in (client.not_ready_reason() or "")
        outcomes = client.generate_many(requests, concurrency=3)
        with pytest.raises(RequestFailed) as info:
            client.generate(requests[0])
    assert info.value.code == "UNAVAILABLE"
    assert len(outcomes) == len(requests)
    assert all(isinstance(o, RequestFailed) and o.code == "UNAVAILABLE" for o in outcomes)


def test_cli_parses_single_request_options() -> None:
    args = cli.parse_args(
        shlex.split(
            "generate --adapter alpha --grpc --url h:1 --max-tokens 5 --temperature 0.7 --top-p 0.9"
            " --top-k 3 --seed 11 'hello there'"
        )
    )
    assert (args.text, args.adapter, args.grpc, args.url) == ("hello there", ["alpha"], True, "h:1")
    assert args.model == "generate"
    [request] = cli.requests_from_args(args)
    options = {"max_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": 3, "seed": 11}
    assert request == GenerateRequest(b"hello there", b"alpha", **options)


def test_cli_defaults_to_base_model_and_unset_options() -> None:
    args = cli.parse_args(["generate", "hi"])
    assert (args.grpc, args.url, args.repeat, args.concurrency) == (False, None, None, None)
    assert cli.requests_from_args(args) == [GenerateRequest(b"hi", b"")]


def test_cli_repeat_spreads_adapters_round_robin() -> None:
    args = cli.parse_args(
        shlex.split(
            "generate --adapter alpha --adapter beta --adapter '' --repeat 7 --concurrency 3 --seed 1 hi"
        )
    )
    requests = cli.requests_from_args(args)
    assert [r.adapter_id for r in requests] == [b"alpha", b"beta", b"", b"alpha", b"beta", b"", b"alpha"]
    assert {(r.text, r.seed) for r in requests} == {(b"hi", 1)}
    assert args.concurrency == 3


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "--concurrency", "2", "hi"],
        ["generate", "--adapter", "a", "--adapter", "b", "hi"],
        ["generate", "--repeat", "0", "hi"],
        ["generate", "--repeat", "many", "hi"],
        ["generate", "--max-tokens", "x", "hi"],
        ["generate"],
        [],
    ],
)
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.parse_args(argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([3.0, 1.0, 2.0], 50, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(range(1, 101)), 95, 95),
        ([5.0], 95, 5.0),
    ],
)
def test_percentile_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert cli.percentile(values, q) == expected


def test_cli_output_lines_and_summary() -> None:
    ok = GenerateResult("line one\nline two", "alpha", "0123456789abcdef", 0.25)
    failed = RequestFailed("NOT_FOUND", "unknown adapter 'nope'", "404")
    assert cli.format_outcome(3, GenerateRequest("x", "nope"), failed).endswith(
        "error NOT_FOUND: unknown adapter 'nope'"
    )
    line = cli.format_outcome(0, GenerateRequest("x", "alpha"), ok)
    assert (
        "alpha" in line and "0123456789ab " in line and "250.0 ms" in line and "line one\\nline two" in line
    )
    assert "<base>" in cli.format_outcome(1, GenerateRequest("x"), GenerateResult("t", "", "", 0.1))
    summary = cli.format_summary([ok, failed, ok], wall_s=2.0)
    assert "ok 2" in summary and "failed 1 (NOT_FOUND 1)" in summary and "1.50 req/s" in summary
    assert "p50 250.0 ms" in summary


@pytest.mark.parametrize("protocol_flag", [[], ["--grpc"]])
def test_cli_unreachable_server_exits_2_naming_the_url(
    protocol_flag: list[str], closed_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"127.0.0.1:{closed_port}"
    assert cli.main(["generate", *protocol_flag, "--url", url, "--timeout", "5", "hi"]) == 2
    assert url in capsys.readouterr().err


def test_cli_unsendable_request_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--max-tokens", str(2**31), "hi"]) == 2
    assert "max_tokens" in capsys.readouterr().err


@pytest.mark.parametrize("module", MODULES)
def test_build_inputs_sends_tenant_id_only_when_set(module) -> None:
    inputs = build_inputs(GenerateRequest("x", "", tenant_id="acme"), module)
    assert [i.name() for i in inputs] == ["text_input", "adapter_id", "tenant_id"]
    assert _sent(inputs[2]).tolist() == [[b"acme"]]
    assert "tenant_id" not in [i.name() for i in build_inputs(GenerateRequest("x"), module)]
    with pytest.raises(ValueError, match="tenant_id must be str or bytes"):
        GenerateRequest("x", tenant_id=3)  # type: ignore[arg-type]


def test_the_listing_prints_one_line_per_adapter_then_the_budgets() -> None:
    from client.cli import format_listing

    listing = {
        "adapters": [
            {"adapter_id": "a", "tier": "device", "kind": "lora", "shape": "r=8",
             "version": "sha256:0123456789ab", "nbytes": 2 << 20, "pinned": True, "in_use": 2, "reason": ""},
            {"adapter_id": "b", "tier": "refused", "kind": "", "shape": "", "version": "", "nbytes": 0,
             "pinned": False, "in_use": 0, "reason": "NaN"},
        ],
        "usage": {"device_bytes": 2 << 20, "device_budget": 1 << 30, "slots": 1, "slot_capacity": 64,
                  "host_bytes": 2 << 20, "host_budget": 2 << 30},
        "loads": 1, "device_loads": 1, "evictions": 0,
    }  # fmt: skip
    lines = format_listing(listing).splitlines()
    assert len(lines) == 4
    assert lines[1].split()[:5] == ["a", "device", "lora", "r=8", "sha256:012345678"]
    assert lines[1].endswith("2.0 MiB  pinned 2 running")
    assert "refused: NaN" in lines[2]
    assert lines[3].startswith("device 2.0 MiB of 1.0 GiB (1 of 64 slots); host 2.0 MiB of 2.0 GiB")


def _recording_http_server(seen: list[dict[str, str]]):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the base class's name)
            seen.append({k.lower(): v for k, v in self.headers.items()})
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"error": "recorded"}'
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (GenerateRequest("hi", "upper"), "upper"),
        (GenerateRequest("hi", "", tenant_id="acme"), "tenant:acme"),
        (GenerateRequest("hi", "été/x"), "%C3%A9t%C3%A9%2Fx"),
        (GenerateRequest("hi", ""), ""),
        (GenerateRequest("hi", "x" * 5000), "sha256:" + hashlib.sha256(b"x" * 5000).hexdigest()),
    ],
)
def test_every_request_carries_its_adapter_for_load_balancers_over_http_and_grpc(request_, expected):
    """The x-adapter-id header (docker/k8s ingress hashing) reaches the wire: a real HTTP server and a real
    gRPC server record what the client sends."""
    from concurrent import futures

    seen_http: list[dict[str, str]] = []
    server = _recording_http_server(seen_http)
    try:
        url = f"127.0.0.1:{server.server_address[1]}"
        with AdapterClient(url, protocol="http", timeout_s=10) as client, pytest.raises(RequestFailed):
            client.generate(request_)
    finally:
        server.shutdown()
    assert seen_http and seen_http[0]["x-adapter-id"] == expected

    seen_grpc: list[dict[str, str]] = []

    class Recorder(grpc.GenericRpcHandler):
        def service(self, handler_call_details):
            seen_grpc.append(dict(handler_call_details.invocation_metadata))
            return None  # UNIMPLEMENTED

    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[Recorder()])
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        with (
            AdapterClient(f"127.0.0.1:{port}", protocol="grpc", timeout_s=10) as client,
            pytest.raises(RequestFailed),
        ):
            client.generate(request_)
    finally:
        grpc_server.stop(None)
    assert seen_grpc and seen_grpc[0]["x-adapter-id"] == expected
