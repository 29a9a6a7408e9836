"""`python -m loadtest {run,local,ui,soak,bench}`: the load test's command line (the Makefile's targets).

Exit status: 0 when every request was answered correctly and the ledger balances, 1 when the load test failed
(a failure, a ledger mismatch, Locust's own error), 2 when it could not start (bad options, no server).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

from client.api import AdapterClient
from loadtest.bench import BenchPoint, bench_markdown, plot
from loadtest.local_server import DEMO, LocalServer, LocalServerError, local_server
from loadtest.memory import MemorySampler, fit_growth, growth_text
from loadtest.options import DEFAULT_REQUEST_TIMEOUT_S, add_traffic_arguments, traffic_config
from loadtest.report import read_summary, write_json
from loadtest.runner import (
    DEFAULT_OUT_ROOT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    PROTOCOL_TRANSPORTS,
    PROTOCOL_USERS,
    LoadResult,
    LoadSettings,
    judge,
    locust_command,
    new_report_dir,
    parse_duration,
    result_text,
    run_load,
    run_locust,
)
from loadtest.traffic import TrafficPlan

SOAK_WARMUP_S = 60.0
SOAK_WARMUP_SHARE = 0.2  # a short smoke run warms up for this share of it instead


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _users_list(text: str) -> tuple[int, ...]:
    try:
        users = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected user counts like 8,32,64") from None
    if not users or min(users) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected user counts >= 1")
    return users


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="the server's host (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="(default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="(default: %(default)s)")


def _add_server(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", type=Path, default=DEMO / "base", help="(default: the demo's)")
    parser.add_argument("--adapter-dir", type=Path, default=DEMO / "adapters", help="(default: the demo's)")


def _add_load(parser: argparse.ArgumentParser, *, users: int = 16, duration: str = "60s") -> None:
    parser.add_argument("--users", type=int, default=users, help="concurrent users (default: %(default)s)")
    parser.add_argument("--spawn-rate", type=float, default=8.0, help="users started per second (default: 8)")
    parser.add_argument(
        "--duration", type=_duration, default=duration, help=f"e.g. 20s, 10m (default: {duration})"
    )
    parser.add_argument("--protocol", choices=sorted(PROTOCOL_USERS), default="both")
    parser.add_argument("--request-timeout", type=float, default=DEFAULT_REQUEST_TIMEOUT_S)
    parser.add_argument("--think-time", type=float, default=0.0, help="seconds between a user's requests")
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT_ROOT,
        help="reports go to OUT/<timestamp>/ (default: %(default)s)",
    )
    add_traffic_arguments(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Locust load test of the generate model; every answer is checked against its task.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="load a running server (make loadtest)")
    _add_target(run)
    _add_load(run)
    local = commands.add_parser("local", help="start a demo server, load it, stop it (make loadtest-local)")
    _add_server(local)
    _add_load(local)
    ui = commands.add_parser("ui", help="Locust's web UI against a running server (make loadtest-ui)")
    _add_target(ui)
    ui.add_argument("--web-port", type=int, default=8089, help="(default: %(default)s)")
    _add_load(ui)
    soak = commands.add_parser("soak", help="mixed load on a demo server, sampling its memory (make soak)")
    _add_server(soak)
    _add_load(soak, duration="10m")
    soak.add_argument("--interval", type=float, default=5.0, help="seconds between memory samples")
    soak.add_argument(
        "--warmup",
        type=_duration,
        default=None,
        help=f"samples before this are left out of the fit (default: {SOAK_WARMUP_S:g} s, or "
        f"{SOAK_WARMUP_SHARE:.0%} of a shorter run)",
    )
    soak.set_defaults(popularity="zipf:1", sampled_share=0.2)
    bench = commands.add_parser("bench", help="the load test at several user counts (make loadtest-bench)")
    _add_server(bench)
    _add_load(bench)
    bench.add_argument(
        "--users-list", type=_users_list, default=(8, 32, 64), help="user counts (default: 8,32,64)"
    )
    bench.set_defaults(spawn_rate=None)
    return parser


def _settings(args: argparse.Namespace) -> LoadSettings:
    """The load test the options describe; ValueError says what is wrong. Commands that start their own
    server fill in its URLs later."""
    traffic = traffic_config(args)
    TrafficPlan.load(traffic)  # refuses unknown adapters or an empty prompt pool before anything starts
    has_target = hasattr(args, "host")
    return LoadSettings(
        http_url=f"{args.host}:{args.http_port}" if has_target else "",
        grpc_url=f"{args.host}:{args.grpc_port}" if has_target else "",
        users=args.users,
        spawn_rate=args.spawn_rate if args.spawn_rate is not None else float(args.users),
        duration_s=args.duration,
        protocol=args.protocol,
        traffic=traffic,
        request_timeout_s=args.request_timeout,
        think_time_s=args.think_time,
    )


def _not_ready(settings: LoadSettings) -> list[str]:
    urls = {"http": settings.http_url, "grpc": settings.grpc_url}
    reasons = []
    for protocol in PROTOCOL_TRANSPORTS[settings.protocol]:
        with AdapterClient(urls[protocol], protocol=protocol, timeout_s=5) as client:
            reason = client.not_ready_reason()
        if reason:
            reasons.append(reason)
    return reasons


def _counted_model(protocol: str) -> str:
    """The model whose inference count covers every request of the run: `generate`, or with streaming users
    `generate_stream` (which also executes each `generate` request, through BLS)."""
    return "generate_stream" if protocol in ("stream", "all") else "generate"


def _inference_count(http_url: str, model: str) -> int:
    with AdapterClient(http_url, timeout_s=10) as client:
        return int(client.inference_statistics(model)["inference_count"])


def _load_own_server(settings: LoadSettings, server: LocalServer, report_dir: Path) -> LoadResult:
    """One load test against our own server. Its count of `generate` inferences must cover the ledger's
    requests; any surplus is the launcher's own canary requests."""
    settings = replace(settings, http_url=server.http_url, grpc_url=server.grpc_url)
    model = _counted_model(settings.protocol)
    before = _inference_count(server.http_url, model)
    exit_code = run_locust(locust_command(settings, report_dir, report_dir.name))
    counted = _inference_count(server.http_url, model) - before
    summary = read_summary(report_dir)
    if summary is None:
        return judge(report_dir, exit_code)
    sent = summary.ledger.sent
    note = f"server: {model} counted {counted} inferences during the run, the ledger sent {sent}"
    if counted > sent:
        note += f" (the other {counted - sent}: the launcher's canary requests)"
    reasons = [f"the server counted fewer inferences than the ledger sent: {counted} < {sent}"]
    return judge(report_dir, exit_code, reasons if counted < sent else [], [note])


def _print(message: str) -> None:
    print(message, flush=True)


def cmd_run(args: argparse.Namespace, settings: LoadSettings) -> int:
    reasons = _not_ready(settings)
    if reasons:
        _print("cannot load the server: " + "; ".join(reasons))
        return EXIT_USAGE
    result = run_load(settings, new_report_dir(args.out))
    _print(result_text(result))
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_local(args: argparse.Namespace, settings: LoadSettings) -> int:
    report_dir = new_report_dir(args.out)
    with local_server(
        report_dir / "server.log", args.base_model, args.adapter_dir, progress=_print
    ) as server:
        result = _load_own_server(settings, server, report_dir)
    _print(result_text(result))
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_ui(args: argparse.Namespace, settings: LoadSettings) -> int:
    reasons = _not_ready(settings)
    if reasons:
        _print("warning: " + "; ".join(reasons))
    report_dir = new_report_dir(args.out, prefix="ui-")
    _print(f"Locust's web UI: http://127.0.0.1:{args.web_port} (Ctrl-C to quit); reports: {report_dir}")
    exit_code = run_locust(
        locust_command(settings, report_dir, report_dir.name, headless=False, web_port=args.web_port)
    )
    if (report_dir / "summary.json").is_file():
        _print(result_text(judge(report_dir, exit_code)))
    return exit_code


def cmd_soak(args: argparse.Namespace, settings: LoadSettings) -> int:
    warmup_s = (
        args.warmup
        if args.warmup is not None
        else min(SOAK_WARMUP_S, SOAK_WARMUP_SHARE * settings.duration_s)
    )
    report_dir = new_report_dir(args.out, prefix="soak-")
    with local_server(
        report_dir / "server.log", args.base_model, args.adapter_dir, progress=_print
    ) as server:
        sampler = MemorySampler(server.launcher_pid, report_dir / "memory.csv", args.interval)
        sampler.start()
        try:
            result = _load_own_server(settings, server, report_dir)
        finally:
            sampler.stop()
    growth = fit_growth(sampler.samples, warmup_s)
    memory = growth_text(growth, sampler.samples)
    write_json(
        report_dir / "memory.json", {"warmup_s": warmup_s, "growth": asdict(growth) if growth else None}
    )
    with (report_dir / "summary.md").open("a") as summary:
        summary.write(f"\n{memory}\n")
    _print(result_text(result))
    _print(memory)
    return EXIT_OK if result.passed else EXIT_FAILED


def cmd_bench(args: argparse.Namespace, base: LoadSettings) -> int:
    report_dir = new_report_dir(args.out, prefix="bench-")
    points: list[BenchPoint] = []
    failed = []
    with local_server(
        report_dir / "server.log", args.base_model, args.adapter_dir, progress=_print
    ) as server:
        for users in args.users_list:
            _print(f"--- {users} users, {base.duration_s:g} s ---")
            spawn_rate = args.spawn_rate if args.spawn_rate is not None else float(users)
            point_dir = report_dir / f"users-{users}"
            point_dir.mkdir()
            result = _load_own_server(replace(base, users=users, spawn_rate=spawn_rate), server, point_dir)
            _print(result_text(result))
            if not result.passed:
                failed.append(users)
            if result.summary is not None:
                points.append(BenchPoint.of(users, result.summary, result.passed))
    date = time.strftime("%Y-%m-%d")
    traffic = base.traffic
    setting = f"protocol {base.protocol}, popularity {traffic.popularity}, sampled {traffic.sampling.share:g}"
    table = bench_markdown(points, date=date, duration_s=base.duration_s, setting=setting)
    (report_dir / "bench.md").write_text(table)
    write_json(
        report_dir / "bench.json", {"date": date, "setting": setting, "points": [asdict(p) for p in points]}
    )
    if points:
        plot(points, report_dir / "bench.png", f"generate, demo model, {setting}")
    _print("\n" + table)
    _print(f"reports: {report_dir}")
    if failed:
        _print(f"FAIL at {', '.join(map(str, failed))} users")
    return EXIT_FAILED if failed else EXIT_OK


COMMANDS = {"run": cmd_run, "local": cmd_local, "ui": cmd_ui, "soak": cmd_soak, "bench": cmd_bench}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        return COMMANDS[args.command](args, settings)
    except LocalServerError as exc:
        _print(f"python -m loadtest {args.command}: {exc}")
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
