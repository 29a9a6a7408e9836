"""Locust users for the `generate` model over HTTP and gRPC; every answer is checked (loadtest.traffic).

Thin glue: draw a request from the plan, send it with tritonclient, check the answer, record it in the
ledger and fire one `events.request` (type "HTTP" / "gRPC" / "gRPC-stream", name `generate[<adapter>]`,
latency, UTF-8 bytes of the answer, the failure as plain text). Run it through `python -m loadtest` (make
loadtest), or directly:

    locust -f loadtest/locustfile.py --triton-http 127.0.0.1:8000 --triton-grpc 127.0.0.1:8001 \
        --stop-timeout 70 HttpGenerateUser GrpcGenerateUser

Distributed mode: each worker reports its ledger snapshot with its stats (`report_to_master`); when the
test stops, the master asks the workers to let their in-flight requests finish and waits for their final
ledgers before it writes the summary.
"""

from __future__ import annotations

import itertools
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: client, training

import gevent
import grpc.experimental.gevent
import numpy as np
import tritonclient.grpc
import tritonclient.http
from locust import User, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsEntry

from client.api import (
    OUTPUTS,
    GenerateRequest,
    RequestFailed,
    build_inputs,
    grpc_channel_args,
    output_count,
    output_text,
    request_failures,
    routing_headers,
)
from client.streaming import stream_generate
from loadtest.ledger import Ledger, LedgerSnapshot, merge
from loadtest.options import add_target_arguments, add_traffic_arguments, traffic_config
from loadtest.report import (
    LEDGER_JSON,
    SUMMARY_JSON,
    SUMMARY_MD,
    FailureExample,
    Latency,
    build_summary,
    format_report,
    stat_key,
    verdict,
    write_json,
)
from loadtest.traffic import OK, Answer, PlannedRequest, ReproducibilityMemo, TrafficPlan, check

# Before any channel exists: gRPC's own threads would otherwise block the gevent loop Locust runs on.
grpc.experimental.gevent.init_gevent()

LOG = logging.getLogger("loadtest")
MODEL = "generate"
LEDGER_KEY = "loadtest_ledger"
DRAIN_MESSAGE = "loadtest_drain"
DRAIN_MARGIN_S = 15.0  # beyond --stop-timeout, for the workers' next report (every 3 s) to arrive
CLIENT_ERROR = "CLIENT_ERROR"


class _Process:
    """This process's share of a run: the traffic plan, the ledger, the reproducibility memo, request ids."""

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        runner = environment.runner
        self.plan = TrafficPlan.load(traffic_config(options))
        self.ledger = Ledger()
        self.memo = ReproducibilityMemo()
        self.worker_index = max(0, getattr(runner, "worker_index", 0))
        process_tag = runner.client_id if isinstance(runner, WorkerRunner) else "local"
        self._prefix = f"{options.run_id}.{process_tag}."
        self._request_numbers = itertools.count()
        self.user_numbers = itertools.count()

    def next_request_id(self) -> str:
        return f"{self._prefix}{next(self._request_numbers)}"


_process: _Process | None = None
_worker_ledgers: dict[str, LedgerSnapshot] = {}  # on the master: each worker's latest report


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    add_traffic_arguments(parser)
    add_target_arguments(parser)


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    runner = environment.runner
    if isinstance(runner, MasterRunner):
        events.worker_report.add_listener(_on_worker_report)
    elif isinstance(runner, WorkerRunner):
        events.report_to_master.add_listener(_on_report_to_master)
        runner.register_message(DRAIN_MESSAGE, _drain_worker, concurrent=True)


@events.test_start.add_listener
def _on_test_start(environment: Environment, **_kwargs: Any) -> None:
    global _process
    if isinstance(environment.runner, MasterRunner):
        _worker_ledgers.clear()
        return
    try:
        _process = _Process(environment)
    except ValueError as exc:  # options python -m loadtest would have refused: say so and quit
        _process = None
        LOG.error("invalid load test options: %s", exc)
        environment.process_exit_code = 2
        gevent.spawn(environment.runner.quit)


def _on_report_to_master(client_id: str, data: dict[str, Any]) -> None:
    if _process is not None:
        data[LEDGER_KEY] = _process.ledger.snapshot().to_dict()


def _on_worker_report(client_id: str, data: dict[str, Any]) -> None:
    if LEDGER_KEY in data:
        _worker_ledgers[client_id] = LedgerSnapshot.from_dict(data[LEDGER_KEY])


def _drain_worker(environment: Environment, msg: Any, **_kwargs: Any) -> None:
    """On a worker, asked by the master: stop the users, letting each finish its request (--stop-timeout),
    and close the ledger; the next report carries it."""
    runner = environment.runner
    if runner.spawning_greenlet is not None:
        runner.spawning_greenlet.kill(block=True)
    runner.stop_users(runner.user_classes_count)
    if _process is not None:
        _process.ledger.final = True


@events.test_stopping.add_listener
def _on_test_stopping(environment: Environment, **_kwargs: Any) -> None:
    """On the master: Locust's --run-time quit does not wait for the workers' users, so drain them here and
    wait for every worker's final ledger."""
    runner = environment.runner
    if not isinstance(runner, MasterRunner) or not runner.clients.all:
        return
    runner.send_message(DRAIN_MESSAGE)
    deadline = time.monotonic() + environment.stop_timeout + DRAIN_MARGIN_S
    while time.monotonic() < deadline:
        workers = [client.id for client in runner.clients.all]
        if all(w in _worker_ledgers and _worker_ledgers[w].final for w in workers):
            return
        gevent.sleep(0.5)
    LOG.error(
        "not every worker sent its final ledger within %.0f s", environment.stop_timeout + DRAIN_MARGIN_S
    )


@events.test_stop.add_listener
def _on_test_stop(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        if _process is not None:
            _process.ledger.final = True
        return
    if isinstance(environment.runner, MasterRunner):
        snapshot = merge(_worker_ledgers.values())
    elif _process is not None:
        _process.ledger.final = True
        snapshot = _process.ledger.snapshot()
    else:
        return
    report_dir = environment.parsed_options.report_dir
    if report_dir:
        _write_reports(environment, snapshot, Path(report_dir))


def _latency(entry: StatsEntry) -> Latency:
    if not entry.num_requests:
        return Latency(0, entry.num_failures)
    return Latency(
        entry.num_requests,
        entry.num_failures,
        *(float(entry.get_response_time_percentile(q)) for q in (0.5, 0.95, 0.99)),
    )


def _merged(environment: Environment, entries: list[StatsEntry], label: str) -> Latency:
    merged = StatsEntry(environment.stats, label, "")
    for entry in entries:
        merged.extend(entry)
    return _latency(merged)


def _write_reports(environment: Environment, snapshot: LedgerSnapshot, report_dir: Path) -> None:
    """ledger.json, summary.json and summary.md in `report_dir`, from Locust's statistics and the ledger."""
    stats = environment.stats
    entries = list(stats.entries.values())
    by_name: dict[str, list[StatsEntry]] = {}
    by_type: dict[str, list[StatsEntry]] = {}
    for entry in entries:
        by_name.setdefault(entry.name, []).append(entry)
        by_type.setdefault(entry.method, []).append(entry)
    options = environment.parsed_options
    summary = build_summary(
        entries={stat_key(e.method, e.name): _latency(e) for e in entries},
        by_name={name: _merged(environment, group, name) for name, group in by_name.items()},
        by_type={kind: _merged(environment, group, kind) for kind, group in by_type.items()},
        total=_latency(stats.total),
        snapshot=snapshot,
        failure_examples=[
            FailureExample(e.method, e.name, str(e.error), e.occurrences) for e in stats.errors.values()
        ],
        run={
            "users": getattr(environment.runner, "target_user_count", None),
            "classes": ",".join(sorted(environment.runner.user_classes_by_name)),
            "http": options.triton_http,
            "grpc": options.triton_grpc,
            "run_id": options.run_id,
        },
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    write_json(report_dir / LEDGER_JSON, snapshot.to_dict())
    write_json(report_dir / SUMMARY_JSON, summary.to_dict())
    (report_dir / SUMMARY_MD).write_text(format_report(summary, verdict(summary, 0)))


def client_request(planned: PlannedRequest) -> GenerateRequest:
    """The client's request for a planned one."""
    return GenerateRequest(
        planned.prompt,
        planned.adapter_id,
        max_tokens=planned.max_tokens,
        temperature=planned.temperature,
        top_p=planned.top_p,
        top_k=planned.top_k,
        seed=planned.seed,
    )


class GenerateUser(User):
    """One client sending back to back (or with --think-time); subclasses choose the protocol."""

    abstract = True
    request_type = ""
    module: Any = None
    url_option = ""  # the option holding this protocol's host:port

    def wait_time(self) -> float:
        return float(self.environment.parsed_options.think_time)

    def on_start(self) -> None:
        if _process is None:  # the options were refused at test_start, which quits the run
            raise RuntimeError("no traffic plan: the options were refused (see above)")
        self.process = _process
        options = self.environment.parsed_options
        user_number = next(self.process.user_numbers)
        self.rng = np.random.default_rng([options.traffic_seed, self.process.worker_index, user_number])
        self.timeout_s = float(options.request_timeout)
        self.url = getattr(options, self.url_option)
        self.triton = self.open_client()

    def on_stop(self) -> None:
        self.triton.close()

    def open_client(self) -> Any:
        raise NotImplementedError

    def infer_kwargs(self) -> dict[str, Any]:
        return {}

    def _infer(self, planned: PlannedRequest, request_id: str) -> Answer:
        request = client_request(planned)
        inputs = build_inputs(request, self.module)
        outputs = [self.module.InferRequestedOutput(name) for name in OUTPUTS]
        with request_failures(self.url, self.request_type, self.timeout_s):
            result = self.triton.infer(
                MODEL,
                inputs,
                outputs=outputs,
                request_id=request_id,
                headers=routing_headers(request),
                **self.infer_kwargs(),
            )
        return Answer(
            output_text(result, "text_output"),
            output_text(result, "served_adapter_id"),
            output_count(result, "generated_tokens"),
        )

    @task
    def generate(self) -> None:
        process = self.process
        planned = process.plan.draw(self.rng)
        request_id = process.next_request_id()
        process.ledger.sent(request_id, stat_key(self.request_type, planned.name))
        start = time.perf_counter()
        outcome, tokens, response_bytes, error = OK, 0, 0, None
        self.first_token_ms: float | None = None  # set by streaming users
        try:
            answer = self._infer(planned, request_id)
        except RequestFailed as failure:
            outcome, error = failure.code, str(failure)
        except Exception as exc:  # a bug here, still one outcome for the ledger and a failure for the run
            outcome, error = CLIENT_ERROR, f"{CLIENT_ERROR}: {type(exc).__name__}: {exc}"
        else:
            tokens, response_bytes = answer.generated_tokens, len(answer.text.encode("utf-8"))
            result = check(planned, answer, process.memo)
            if not result.ok:
                outcome, error = result.kind, f"{result.kind}: {result.detail}"
        elapsed_ms = (time.perf_counter() - start) * 1000
        process.ledger.settled(request_id, outcome, tokens, response_bytes, self.first_token_ms)
        events.request.fire(
            request_type=self.request_type,
            name=planned.name,
            response_time=elapsed_ms,
            response_length=response_bytes,
            exception=error,
            context={"request_id": request_id},
        )


class HttpGenerateUser(GenerateUser):
    """tritonclient.http (geventhttpclient): one client, one connection, per user."""

    request_type = "HTTP"
    module = tritonclient.http
    url_option = "triton_http"

    def open_client(self) -> Any:
        return tritonclient.http.InferenceServerClient(
            self.url, connection_timeout=self.timeout_s, network_timeout=self.timeout_s
        )


class GrpcGenerateUser(GenerateUser):
    """tritonclient.grpc on the gevent-aware gRPC core: one channel per user."""

    request_type = "gRPC"
    module = tritonclient.grpc
    url_option = "triton_grpc"

    def open_client(self) -> Any:
        return tritonclient.grpc.InferenceServerClient(self.url, channel_args=grpc_channel_args())

    def infer_kwargs(self) -> dict[str, Any]:
        return {"client_timeout": self.timeout_s}


class GrpcStreamUser(GenerateUser):
    """`generate_stream` over gRPC streaming: the answer is the streamed deltas joined (checked like any
    other), and the ledger keeps each answer's time to first token (the first response with text)."""

    request_type = "gRPC-stream"
    module = tritonclient.grpc
    url_option = "triton_grpc"

    def open_client(self) -> Any:
        return None  # one stream (and channel) per request: client.streaming

    def on_stop(self) -> None:
        pass

    def _infer(self, planned: PlannedRequest, request_id: str) -> Answer:
        request = client_request(planned)
        parts: list[str] = []
        last = None
        for chunk in stream_generate(self.url, "grpc", request, timeout_s=self.timeout_s):
            if chunk.text and self.first_token_ms is None:
                self.first_token_ms = chunk.elapsed_s * 1000
            parts.append(chunk.text)
            last = chunk
        if last is None:
            raise RequestFailed("UNAVAILABLE", "the stream ended without a response")
        return Answer("".join(parts), last.adapter_id, last.generated_tokens)
