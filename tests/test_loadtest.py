"""The load test against the real server: a bounded mixed run must pass with a balanced ledger that the
server's own count confirms, and a run whose oracle is told a wrong task must fail, naming the adapter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from client import AdapterClient
from loadtest.ledger import LedgerSnapshot, reconcile
from loadtest.traffic import WRONG_ANSWER, request_name
from tests.conftest import DEMO_TASKS, ROOT

LOAD_TIMEOUT_S = 240


def run_loadtest(server, out: Path, *options: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`python -m loadtest run` against `server`; its result and its report directory."""
    host, http_port = server.http_url.rsplit(":", 1)
    grpc_port = server.grpc_url.rsplit(":", 1)[1]
    command = [sys.executable, "-m", "loadtest", "run", "--host", host, "--http-port", http_port]
    command += ["--grpc-port", grpc_port, "--out", str(out), *options]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=LOAD_TIMEOUT_S)
    reports = [path for path in out.iterdir() if path.is_dir()]
    assert len(reports) == 1, (reports, result.stdout[-4000:], result.stderr[-4000:])
    return result, reports[0]


def output(result: subprocess.CompletedProcess[str]) -> str:
    return f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"


def test_mixed_load_answers_every_request_right_and_accounts_for_each(demo_server, tmp_path) -> None:
    with AdapterClient(demo_server.http_url) as client:
        before = client.inference_statistics("generate")["inference_count"]
        result, report = run_loadtest(
            demo_server,
            tmp_path,
            *("--users", "32", "--spawn-rate", "16", "--duration", "20s", "--protocol", "both"),
            *("--sampled-share", "0.2", "--seeds", "2", "--sampled-prompts", "4"),
        )
        after = client.inference_statistics("generate")["inference_count"]

    assert result.returncode == 0, output(result)
    assert "PASS" in result.stdout
    ledger = reconcile(LedgerSnapshot.from_dict(json.loads((report / "ledger.json").read_text())))
    assert ledger.clean and ledger.failed == 0, ledger.line()
    assert ledger.sent > 0 and after - before == ledger.sent  # the server saw exactly the ledger's requests

    summary = json.loads((report / "summary.json").read_text())
    requests = {row["label"]: row["requests"] for row in summary["rows"]}
    assert set(requests) == {request_name(adapter_id) for adapter_id in DEMO_TASKS}
    assert all(count > 0 for count in requests.values()), requests
    assert {row["label"]: row["requests"] > 0 for row in summary["protocols"]} == {"HTTP": True, "gRPC": True}
    assert summary["total"]["failures"] == 0 and summary["total"]["tokens_per_s"] > 0
    for name in ("report.html", "locust_stats.csv", "locust_failures.csv", "summary.md"):
        assert (report / name).is_file(), name


def test_a_wrong_answer_fails_the_run_and_names_its_adapter(demo_server, tmp_path) -> None:
    result, report = run_loadtest(
        demo_server,
        tmp_path,
        *("--users", "2", "--spawn-rate", "2", "--duration", "3s", "--protocol", "http"),
        *("--adapters", "upper", "--base-share", "0", "--task-override", "upper=reverse"),
    )

    assert result.returncode == 1, output(result)
    assert "FAIL" in result.stdout and "generate[upper]" in result.stdout
    ledger = reconcile(LedgerSnapshot.from_dict(json.loads((report / "ledger.json").read_text())))
    assert ledger.clean, ledger.line()  # the books balance: the failures are answers, not lost requests
    assert set(ledger.failures) == {WRONG_ANSWER} and ledger.failed > 0
    summary = json.loads((report / "summary.json").read_text())
    assert [(row["label"], row["failures"] > 0) for row in summary["rows"]] == [("generate[upper]", True)]
    assert "WRONG_ANSWER" in (report / "summary.md").read_text()


def test_a_streaming_load_checks_every_streamed_answer_and_reports_time_to_first_token(
    demo_server, tmp_path
) -> None:
    """Users on `generate_stream` over gRPC streaming: the deltas joined are checked like any answer, and
    every answer's time to first token is in the ledger and the report."""
    with AdapterClient(demo_server.http_url) as client:
        before = client.inference_statistics("generate_stream")["inference_count"]
        result, report = run_loadtest(
            demo_server,
            tmp_path,
            *("--users", "8", "--spawn-rate", "8", "--duration", "8s", "--protocol", "stream"),
        )
        after = client.inference_statistics("generate_stream")["inference_count"]

    assert result.returncode == 0, output(result)
    snapshot = LedgerSnapshot.from_dict(json.loads((report / "ledger.json").read_text()))
    ledger = reconcile(snapshot)
    assert ledger.clean and ledger.failed == 0 and ledger.sent > 0, ledger.line()
    assert after - before == ledger.sent  # every request reached the streaming model once
    for name, tally in snapshot.tallies.items():
        assert name.startswith("gRPC-stream ")
        assert len(tally.first_token_ms) == tally.ok  # one time to first token per answer
    summary = json.loads((report / "summary.json").read_text())
    (protocol,) = summary["protocols"]
    assert protocol["label"] == "gRPC-stream"
    assert 0 < protocol["ttft_p50_ms"] <= protocol["p50_ms"]  # the first token comes before the answer ends
    assert "TTFT p50 ms" in (report / "summary.md").read_text()
