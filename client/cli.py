"""`python -m client generate ...`: one request, or a concurrent burst with a latency summary.
`python -m client compare --adapter ID`: the adapter bank against the merged variant of ID, side by side.
`python -m client health`: one canary inference per served generate model; fails naming any that fails.
`python -m client adapters`: the serving model's adapters (tier, kind, shape, version, bytes) and budgets.

Exit status: 0 all requests succeeded, 1 some request failed, 2 bad usage or no ready server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from client.api import AdapterClient, GenerateRequest, GenerateResult, RequestFailed
from client.health import CanaryResult, check

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_ANSWER_CHARS = 100
_VERSION_CHARS = 12
_LISTED_VERSION_CHARS = 16  # sha256: and 9 hex digits


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text with an adapter (or the base model)")
    gen.add_argument("text", metavar="TEXT", help="prompt text")
    gen.add_argument(
        "--adapter",
        action="append",
        metavar="ID",
        help="adapter id ('' = base model); repeat it to spread --repeat requests round-robin",
    )
    gen.add_argument("--tenant", metavar="ID", help="tenant id (servers with a tenant policy need one)")
    gen.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    gen.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    gen.add_argument("--model", default="generate", help="Triton model name (default: generate)")
    gen.add_argument("--max-tokens", type=int, metavar="N")
    gen.add_argument("--temperature", type=float, metavar="T", help="0 = greedy (the server default)")
    gen.add_argument("--top-p", type=float, metavar="P")
    gen.add_argument("--top-k", type=int, metavar="K")
    gen.add_argument("--seed", type=int, metavar="S")
    gen.add_argument("--repeat", type=_positive_int, metavar="M", help="send M requests and summarise")
    gen.add_argument(
        "--concurrency", type=_positive_int, metavar="N", help="requests in flight (with --repeat)"
    )
    gen.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="per-request timeout in seconds"
    )
    gen.add_argument("--verbose", "-v", action="store_true", help="show adapter, version and latency in full")
    gen.add_argument(
        "--stream",
        action="store_true",
        help="print the text as it is generated (model generate_stream, gRPC streaming or HTTP SSE)",
    )

    cmp = commands.add_parser(
        "compare",
        help="adapter bank vs merged-weight variant of one adapter: agreement, latency, throughput, memory",
    )
    cmp.add_argument("--adapter", required=True, metavar="ID", help="a LoRA adapter served merged as well")
    cmp.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    cmp.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    cmp.add_argument("--prompts", type=_positive_int, default=64, metavar="N", help="prompts per round (64)")
    cmp.add_argument("--concurrency", type=_positive_int, default=16, metavar="N", help="in flight (16)")
    cmp.add_argument(
        "--rounds", type=_positive_int, default=3, metavar="R", help="measured rounds per path (3)"
    )
    cmp.add_argument("--max-tokens", type=int, metavar="N")
    cmp.add_argument("--seed", type=int, default=0, help="seed of the random prompts (0)")
    cmp.add_argument("--timeout", type=float, default=120.0, metavar="S", help="per-request timeout (120 s)")
    cmp.add_argument(
        "--offline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also load both models in this process (greedy token agreement, max logit difference); "
        "skipped with a note when the model directories are not on this machine (default: on)",
    )
    cmp.add_argument(
        "--base-model", type=Path, help="base model for --offline (default: env BASE_MODEL or demo)"
    )
    cmp.add_argument(
        "--adapter-dir", type=Path, help="adapters for --offline (default: env ADAPTER_DIR or demo)"
    )
    cmp.add_argument(
        "--merged-dir", type=Path, help="merged weights for --offline (default: build/merged/ID)"
    )
    health = commands.add_parser(
        "health",
        help="one canary inference per generate model (generate, generate_merged_<id>); "
        "exit 1 naming any that fails",
    )
    health.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    health.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    health.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="check only this model (repeatable; default: every model taking the generate contract)",
    )
    health.add_argument(
        "--timeout", type=float, default=10.0, metavar="S", help="per-canary timeout in seconds (10)"
    )
    health.add_argument(
        "--tenant",
        metavar="ID",
        help="send the canary as this tenant (a server with a tenant policy refuses requests without one; "
        "the tenant's default adapter then answers)",
    )
    listing = commands.add_parser(
        "adapters", help="the adapters of the serving model's store: tier, kind, shape, version, bytes, use"
    )
    listing.add_argument("--grpc", action="store_true", help="use gRPC instead of HTTP")
    listing.add_argument("--url", help="host:port (default localhost:8000 for HTTP, localhost:8001 for gRPC)")
    listing.add_argument("--model", default="generate", help="Triton model name (default: generate)")
    listing.add_argument("--tenant", metavar="ID", help="list what this tenant may use (tenant policy)")
    listing.add_argument("--json", action="store_true", help="print the server's JSON as it is")
    listing.add_argument("--timeout", type=float, default=10.0, metavar="S", help="timeout in seconds (10)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate" and args.stream and args.repeat is not None:
        parser.error("--stream sends one request; leave out --repeat")
    if args.command == "generate" and args.repeat is None:
        if args.concurrency is not None:
            parser.error("--concurrency needs --repeat")
        if args.adapter and len(args.adapter) > 1:
            parser.error("several --adapter values need --repeat")
    return args


def requests_from_args(args: argparse.Namespace) -> list[GenerateRequest]:
    """`--repeat` requests (one without it), adapters assigned round-robin.

    Text and ids go out as the exact bytes given on the command line, even when not UTF-8.
    """
    adapters = args.adapter or [""]
    return [
        GenerateRequest(
            text=os.fsencode(args.text),
            adapter_id=os.fsencode(adapters[i % len(adapters)]),
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            tenant_id=args.tenant,
        )
        for i in range(args.repeat or 1)
    ]


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, q in (0, 100]; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _adapter_label(adapter_id: str | bytes) -> str:
    label = os.fsdecode(adapter_id) if isinstance(adapter_id, bytes) else adapter_id
    return label or "<base>"


def _one_line(text: str, verbose: bool) -> str:
    text = text.replace("\n", "\\n")
    return text if verbose or len(text) <= _ANSWER_CHARS else text[: _ANSWER_CHARS - 3] + "..."


def format_outcome(
    index: int, request: GenerateRequest, outcome: GenerateResult | RequestFailed, verbose: bool = False
) -> str:
    head = f"{index:>5}  {_adapter_label(request.adapter_id):<16}"
    if isinstance(outcome, RequestFailed):
        return f"{head}  error {outcome.code}: {outcome.message}"
    version = outcome.adapter_version if verbose else outcome.adapter_version[:_VERSION_CHARS]
    return f"{head}  {version or '-':<{_VERSION_CHARS}}  {outcome.latency_s * 1e3:9.1f} ms  " + _one_line(
        outcome.text, verbose
    )


def format_summary(outcomes: Sequence[GenerateResult | RequestFailed], wall_s: float) -> str:
    latencies = [o.latency_s for o in outcomes if isinstance(o, GenerateResult)]
    failures = Counter(o.code for o in outcomes if isinstance(o, RequestFailed))
    failed = sum(failures.values())
    by_code = " (" + ", ".join(f"{code} {n}" for code, n in sorted(failures.items())) + ")" if failed else ""
    p50, p95 = (percentile(latencies, q) * 1e3 for q in (50, 95))
    rate = len(outcomes) / wall_s if wall_s > 0 else math.nan
    return (
        f"ok {len(latencies)}  failed {failed}{by_code}  p50 {p50:.1f} ms  p95 {p95:.1f} ms  "
        f"{rate:.2f} req/s over {wall_s:.2f} s"
    )


def _run_generate(args: argparse.Namespace) -> int:
    try:
        requests = requests_from_args(args)
        client = AdapterClient(
            url=args.url, protocol="grpc" if args.grpc else "http", model=args.model, timeout_s=args.timeout
        )
    except ValueError as exc:  # a request or URL that cannot be sent at all
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with client:
        reason = client.not_ready_reason()
        if reason is not None:
            print(f"error: {reason}", file=sys.stderr)
            return EXIT_USAGE
        if args.stream:
            return _streamed(client, requests[0], args.model, args.verbose)
        if args.repeat is None:
            return _single(client, requests[0], args.verbose)
        start = time.perf_counter()
        outcomes = client.generate_many(requests, concurrency=args.concurrency or 1)
        wall_s = time.perf_counter() - start
    for index, (request, outcome) in enumerate(zip(requests, outcomes, strict=True)):
        print(format_outcome(index, request, outcome, args.verbose))
    print(format_summary(outcomes, wall_s))
    return EXIT_FAILED if any(isinstance(o, RequestFailed) for o in outcomes) else EXIT_OK


def _single(client: AdapterClient, request: GenerateRequest, verbose: bool) -> int:
    try:
        result = client.generate(request)
    except RequestFailed as failure:
        print(f"error {failure.code}: {failure.message}", file=sys.stderr)
        return EXIT_FAILED
    print(result.text)
    if verbose:
        print(
            f"adapter {_adapter_label(result.adapter_id)}  version {result.adapter_version or '-'}  "
            f"latency {result.latency_s * 1e3:.1f} ms",
            file=sys.stderr,
        )
    return EXIT_OK


def _streamed(client: AdapterClient, request: GenerateRequest, model: str, verbose: bool) -> int:
    from client.streaming import STREAM_MODEL, stream_generate

    chunks = stream_generate(
        client.url,
        client.protocol,
        request,
        model=STREAM_MODEL if model == "generate" else model,
        timeout_s=client.timeout_s,
    )
    first = last = None
    try:
        for chunk in chunks:
            first = first or chunk
            last = chunk
            print(chunk.text, end="", flush=True)
    except RequestFailed as failure:
        print(
            f"\nerror {failure.code}: {failure.message}"
            if first
            else f"error {failure.code}: {failure.message}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except KeyboardInterrupt:  # closing the stream cancels the request on the server
        chunks.close()
        print("\ncancelled", file=sys.stderr)
        return EXIT_FAILED
    print()
    if verbose and first and last:
        print(
            f"adapter {_adapter_label(last.adapter_id)}  version {last.adapter_version or '-'}  "
            f"first text {first.elapsed_s * 1e3:.1f} ms  total {last.elapsed_s * 1e3:.1f} ms  "
            f"{last.generated_tokens} tokens  finish {last.finish_reason}",
            file=sys.stderr,
        )
    return EXIT_OK


def _run_compare(args: argparse.Namespace) -> int:
    from client import compare

    prompts = compare.random_prompts(args.prompts, seed=args.seed)
    try:
        compare.check_adapter_id(args.adapter)
        comparison = compare.compare_paths(
            args.url,
            "grpc" if args.grpc else "http",
            args.adapter,
            prompts,
            concurrency=args.concurrency,
            rounds=args.rounds,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
        )
    except (RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    offline, note = None, None
    if args.offline:
        demo = compare.PROJECT_ROOT / "models" / "demo"
        paths = (
            args.base_model or Path(os.environ.get("BASE_MODEL") or demo / "base"),
            args.adapter_dir or Path(os.environ.get("ADAPTER_DIR") or demo / "adapters"),
            args.merged_dir or compare.default_merged_dir(args.adapter),
        )
        missing = [str(path) for path in paths if not path.is_dir()]
        if missing:
            note = f"offline check skipped: not on this machine: {', '.join(missing)} (see --merged-dir)"
        else:
            try:
                offline = compare.offline_check(
                    *paths, args.adapter, prompts, max_tokens=args.max_tokens or 64
                )
            except (ValueError, OSError) as exc:  # ConfigError and AdapterLoadError are ValueErrors
                note = f"offline check failed: {exc}"
    print(compare.format_report(comparison, args.concurrency, offline))
    if note:
        print(note)
    failed = comparison.bank.failures or comparison.merged.failures
    return EXIT_FAILED if failed or comparison.agreeing < len(prompts) else EXIT_OK


def format_canary(result: CanaryResult) -> str:
    if result.ok:
        return f"{result.model:<32} ok      {result.latency_s * 1e3:9.1f} ms"
    return f"{result.model:<32} FAILED  {result.code}: {_one_line(result.message, False)}"


def _run_health(args: argparse.Namespace) -> int:
    try:
        results = check(
            args.url,
            "grpc" if args.grpc else "http",
            args.model or (),
            timeout_s=args.timeout,
            tenant_id=args.tenant,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RequestFailed as failure:
        print(f"unhealthy: cannot list the served models: {failure}", file=sys.stderr)
        return EXIT_FAILED
    if not results:
        print("unhealthy: the server serves no model that takes the generate contract", file=sys.stderr)
        return EXIT_FAILED
    for result in results:
        print(format_canary(result))
    failed = [result.model for result in results if not result.ok]
    if failed:
        print(f"unhealthy: {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def format_listing(listing: dict) -> str:
    """The listing as a table: one line per adapter, then the budgets and counters."""
    rows = listing["adapters"]
    lines = [f"{'adapter':<24} {'tier':<28} {'kind':<10} {'shape':<10} {'version':<16} {'bytes':>10}  use"]
    for row in rows:
        use = ("pinned " if row.get("pinned") else "") + (
            f"{row['in_use']} running" if row.get("in_use") else ""
        )
        tier = row["tier"] + (f": {row['reason']}" if row.get("reason") else "")
        version = (row.get("version") or "-")[:_LISTED_VERSION_CHARS]
        line = (
            f"{row['adapter_id']:<24} {tier:<28} {row.get('kind') or '-':<10} {row.get('shape') or '-':<10} "
            f"{version:<16} {_size(row.get('nbytes', 0)):>10}  {use}"
        )
        lines.append(line.rstrip())
    usage = listing.get("usage", {})
    if usage:
        lines.append(
            f"device {_size(usage['device_bytes'])} of {_size(usage['device_budget'])} "
            f"({usage['slots']} of {usage['slot_capacity']} slots); "
            f"host {_size(usage['host_bytes'])} of {_size(usage['host_budget'])}; "
            f"loads {listing.get('loads', 0)} from the store, "
            f"{listing.get('device_loads', 0)} onto the device, evictions {listing.get('evictions', 0)}"
        )
    base = listing.get("base")
    if base:
        lines.append(f"base: {base['description']}")
    return "\n".join(lines)


def _run_adapters(args: argparse.Namespace) -> int:
    try:
        with AdapterClient(
            args.url, protocol="grpc" if args.grpc else "http", model=args.model, timeout_s=args.timeout
        ) as client:
            listing = client.adapters(args.tenant)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RequestFailed as failure:
        print(f"error: {failure}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(listing, indent=2) if args.json else format_listing(listing))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "adapters":
            return _run_adapters(args)
        if args.command == "compare":
            return _run_compare(args)
        if args.command == "health":
            return _run_health(args)
        return _run_generate(args)
    except KeyboardInterrupt:
        return 130
