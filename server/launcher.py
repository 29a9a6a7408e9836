"""``python -m server``: run tritonserver in the foreground on the project's model repository.

Options default from the environment (HTTP_PORT, GRPC_PORT, METRICS_PORT, BASE_MODEL, ADAPTER_DIR, MERGED);
arguments after ``--`` go to tritonserver unchanged. The log is streamed to stdout; once
``/v2/health/ready`` answers 200 a READY banner shows the URLs. Then the supervisor (server.supervisor)
watches the server and heals a model whose stub died or hung, or restarts tritonserver (``--no-supervise``
turns it off). Ctrl-C / SIGTERM are forwarded to tritonserver, and the launcher exits with its exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import shlex
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import FrameType

from multiadapter.parsing import (
    QUANTIZATIONS,  # noqa: E402 (torch-free; server.config puts backend_src on the path)
)

from server.config import DEFAULT_EXIT_TIMEOUT_SECS, DEFAULT_MODEL_REPOSITORY, LOOPBACK, ServerConfig
from server.errors import LaunchError, ServerStartError
from server.process import DEFAULT_READY_TIMEOUT_S, ServerProcess, launch
from server.supervisor import HealthPolicy, Supervisor

LOG = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_LAUNCH_ERROR = 2
EXIT_NOT_READY = 1


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The CLI parser; defaults come from ``environ`` (string defaults go through each ``type``)."""
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Run the multi-adapter Triton server in the foreground.",
        epilog="Arguments after -- are passed to tritonserver unchanged.",
    )
    parser.add_argument(
        "--model-repository",
        type=Path,
        default=DEFAULT_MODEL_REPOSITORY,
        help="Triton model repository (default: %(default)s)",
    )
    for name, env_var, default in (
        ("http", "HTTP_PORT", 8000),
        ("grpc", "GRPC_PORT", 8001),
        ("metrics", "METRICS_PORT", 8002),
    ):
        parser.add_argument(
            f"--{name}-port",
            type=port_number,
            default=environ.get(env_var) or str(default),
            help=f"(env {env_var}, default {default})",
        )
    parser.add_argument(
        "--base-model",
        type=Path,
        default=environ.get("BASE_MODEL") or None,
        help="Hugging Face model directory of the base model (env BASE_MODEL)",
    )
    parser.add_argument(
        "--adapter-dir",
        type=Path,
        default=environ.get("ADAPTER_DIR") or None,
        help="directory with one subdirectory per adapter (env ADAPTER_DIR)",
    )
    parser.add_argument(
        "--merged",
        type=merged_ids,
        default=environ.get("MERGED") or "",
        help="comma-separated LoRA adapter ids to also serve as merged-weight variants "
        "(generate_merged_<id>), built first where missing (env MERGED)",
    )
    cache = parser.add_argument_group("adapter cache and tenants (default: the model's config.pbtxt)")
    cache.add_argument(
        "--adapter-device-bytes",
        default=environ.get("ADAPTER_DEVICE_BYTES") or None,
        metavar="SIZE",
        help="bytes of adapter weights on the device, e.g. 512MiB (env ADAPTER_DEVICE_BYTES; default 1GiB)",
    )
    cache.add_argument(
        "--adapter-host-bytes",
        default=environ.get("ADAPTER_HOST_BYTES") or None,
        metavar="SIZE",
        help="bytes of validated adapters kept in host memory (env ADAPTER_HOST_BYTES; default 2GiB)",
    )
    cache.add_argument(
        "--preload",
        default=environ.get("PRELOAD"),
        metavar="IDS",
        help="adapters loaded at start: '*' (all that fit, the default), ids separated by commas, or '' "
        "for none (env PRELOAD)",
    )
    cache.add_argument(
        "--pin",
        default=environ.get("PIN") or None,
        metavar="IDS",
        help="adapters never evicted, ids separated by commas (env PIN)",
    )
    parser.add_argument(
        "--quantize",
        default=environ.get("QUANTIZE") or None,
        choices=QUANTIZATIONS,
        help="quantize the base's linear layers at load with bitsandbytes: nf4 (QLoRA's 4-bit) or int8 "
        "(LLM.int8); the output head stays unquantized (env QUANTIZE; default: the model's config.pbtxt, "
        "none)",
    )
    cache.add_argument(
        "--tenants",
        type=Path,
        default=environ.get("TENANTS") or None,
        metavar="FILE",
        help="tenant policy (JSON): each request then names its tenant_id (env TENANTS)",
    )
    parser.add_argument(
        "--address",
        default=LOOPBACK,
        help="address the HTTP, gRPC and metrics endpoints bind to (default: %(default)s)",
    )
    parser.add_argument(
        "--log-verbose",
        type=int,
        nargs="?",
        const=1,
        default=0,
        help="tritonserver verbose log level (bare flag: 1)",
    )
    parser.add_argument(
        "--exit-timeout-secs",
        type=int,
        default=DEFAULT_EXIT_TIMEOUT_SECS,
        help="how long tritonserver waits for in-flight requests on shutdown (default: %(default)s)",
    )
    parser.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_READY_TIMEOUT_S,
        help="seconds to wait for /v2/health/ready (default: %(default)s)",
    )
    health = parser.add_argument_group("self-healing (server.supervisor)")
    health.add_argument(
        "--no-supervise",
        dest="supervise",
        action="store_false",
        help="only run tritonserver: no canary, no healing, no model control",
    )
    defaults = HealthPolicy()
    health.add_argument(
        "--health-interval",
        type=positive_seconds,
        default=defaults.canary_interval_s,
        metavar="S",
        help="seconds between canary inferences on every generate model (default: %(default)s)",
    )
    health.add_argument(
        "--canary-timeout",
        type=positive_seconds,
        default=defaults.canary_timeout_s,
        metavar="S",
        help="a canary that takes longer fails (default: %(default)s)",
    )
    health.add_argument(
        "--hang-timeout",
        type=positive_seconds,
        default=defaults.hang_timeout_s,
        metavar="S",
        help="a model with requests waiting that executes nothing this long is hung and is restarted; "
        "keep it above the slowest legitimate batch (default: %(default)s)",
    )
    return parser


def positive_seconds(text: str) -> float:
    """argparse type for a duration in seconds, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type for a TCP port."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError(f"{port} is outside 1-65535")
    return port


def merged_ids(text: str) -> tuple[str, ...]:
    """argparse type for --merged: comma-separated adapter ids (names, never paths)."""
    from tools.merge import MergeError, parse_ids

    if not text.strip():
        return ()
    try:
        return tuple(parse_ids(text))
    except MergeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` at the first ``--``: (launcher arguments, tritonserver arguments)."""
    if "--" not in argv:
        return list(argv), []
    cut = list(argv).index("--")
    return list(argv[:cut]), list(argv[cut + 1 :])


def parse_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[ServerConfig, argparse.Namespace]:
    """Parse the command line into a (not yet validated) ServerConfig and the raw namespace."""
    own, passthrough = split_passthrough(argv)
    args = build_parser(environ).parse_args(own)
    config = ServerConfig(
        model_repository=args.model_repository,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        base_model=args.base_model,
        adapter_dir=args.adapter_dir,
        adapter_device_bytes=args.adapter_device_bytes,
        adapter_host_bytes=args.adapter_host_bytes,
        preload_adapters=args.preload,
        pinned_adapters=args.pin,
        tenant_policy=args.tenants,
        quantization=args.quantize,
        address=args.address,
        log_verbose=args.log_verbose,
        exit_timeout_secs=args.exit_timeout_secs,
        extra_args=tuple(passthrough),
        admin_token=secrets.token_hex(16) if args.supervise else None,
    )
    return config, args


def health_policy(args: argparse.Namespace) -> HealthPolicy | None:
    """The supervisor's policy from the command line; None with --no-supervise."""
    if not args.supervise:
        return None
    return HealthPolicy(
        canary_interval_s=args.health_interval,
        canary_timeout_s=args.canary_timeout,
        hang_timeout_s=args.hang_timeout,
        ready_timeout_s=args.ready_timeout,
    )


def discover_adapter_ids(adapter_dir: Path | None) -> list[str]:
    """Sorted names of the subdirectories of ``adapter_dir`` that hold an ``adapter_config.json``."""
    if adapter_dir is None or not adapter_dir.is_dir():
        return []
    return sorted(path.parent.name for path in adapter_dir.glob("*/adapter_config.json"))


def format_banner(config: ServerConfig, adapter_ids: Sequence[str], merged: Sequence[str] = ()) -> str:
    """The READY banner: endpoints, what is served, and a client command to try."""
    example_adapter = adapter_ids[0] if adapter_ids else ""
    adapters = ", ".join(adapter_ids) if adapter_ids else "none found"
    lines = [
        "Triton is READY",
        f"  HTTP      http://{config.http_url}",
        f"  gRPC      {config.grpc_url}",
        f"  metrics   http://{config.metrics_url}/metrics",
        f"  models    {config.model_repository}",
        *(f"            {repository}" for repository in config.extra_repositories),
        f"  base      {config.base_model or '(not set)'}",
        f"  adapters  {config.adapter_dir or '(not set)'} [{adapters}]",
        *([f"  merged    {', '.join(f'generate_merged_{a}' for a in merged)}"] if merged else []),
        "Try:",
        "  "
        + shlex.join(
            [
                _python_command(),
                "-m",
                "client",
                "generate",
                *_url_flag(config),
                "--adapter",
                example_adapter,
                "hello",
            ]
        ),
        *(
            [
                "  "
                + shlex.join(
                    [_python_command(), "-m", "client", "compare", *_url_flag(config), "--adapter", merged[0]]
                )
            ]
            if merged
            else []
        ),
        "Stop with Ctrl-C.",
    ]
    rule = "=" * max(len(line) for line in lines)
    return "\n".join([rule, *lines, rule])


def _python_command() -> str:
    """This interpreter, as a relative path when it lives under the working directory (the .venv)."""
    here = Path.cwd()
    exe = Path(sys.executable)
    return str(exe.relative_to(here)) if exe.is_relative_to(here) else "python"


def _url_flag(config: ServerConfig) -> list[str]:
    return [] if config.http_port == 8000 else ["--url", config.http_url]


def _reap(server: ServerProcess) -> int:
    """Wait for tritonserver, then kill what is left of its process group (stubs orphaned by a crash on the
    way out); its shell-style exit status."""
    returncode = server.wait()
    server.kill()
    return exit_status(returncode)


def exit_status(returncode: int) -> int:
    """A shell-style exit status for a child's return code (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


class _SignalForwarder:
    """Signal handler forwarding SIGINT/SIGTERM to tritonserver once it runs; remembers the last one and
    tells the supervisor (if any) that the server's exit is now expected."""

    def __init__(self) -> None:
        self.server: ServerProcess | None = None
        self.received: int | None = None
        self.supervisor: Supervisor | None = None

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.server is not None:
            self.server.send_signal(signum)

    def attach(self, server: ServerProcess) -> None:
        self.server = server


@contextmanager
def _forwarding_signals() -> Iterator[_SignalForwarder]:
    forwarder = _SignalForwarder()
    previous = {signum: signal.signal(signum, forwarder) for signum in FORWARDED_SIGNALS}
    try:
        yield forwarder
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def with_merged_variants(
    config: ServerConfig, merged: Sequence[str], out: Path | None = None
) -> ServerConfig:
    """``config`` serving the merged variants of ``merged`` too, built (tools.merge, under ``out``, default
    build/merged) where missing."""
    if not merged:
        return config
    from tools.merge import DEFAULT_OUT, build_variants

    if config.base_model is None or config.adapter_dir is None:
        raise LaunchError("--merged needs --base-model and --adapter-dir (the adapters to merge)")
    variants = build_variants(
        merged, base_model=config.base_model, adapter_dir=config.adapter_dir, out=out or DEFAULT_OUT
    )
    return replace(config, extra_repositories=(*config.extra_repositories, *(v.repository for v in variants)))


def run(
    config: ServerConfig,
    ready_timeout_s: float,
    merged: Sequence[str] = (),
    policy: HealthPolicy | None = None,
) -> int:
    """Launch, wait for readiness, print the banner, then supervise tritonserver (or only wait for it,
    without ``policy``); return its exit status."""
    with _forwarding_signals() as forwarder:
        try:
            server = launch(config, log_stream=sys.stdout)
        except LaunchError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_LAUNCH_ERROR
        forwarder.server = server
        if forwarder.received is not None:  # interrupted while preparing
            server.send_signal(forwarder.received)
        try:
            server.wait_ready(ready_timeout_s)
        except ServerStartError as exc:
            if forwarder.received is not None:
                return _reap(server)
            server.stop()
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_NOT_READY
        if forwarder.received is not None:
            return _reap(server)
        banner = format_banner(server.config, discover_adapter_ids(server.config.adapter_dir), merged)
        print(banner, flush=True)
        if policy is None:
            return _reap(server)
        supervisor = Supervisor(
            server,
            policy,
            relaunch=lambda: launch(config, log_stream=sys.stdout),
            on_new_server=forwarder.attach,
        )
        forwarder.supervisor = supervisor
        if forwarder.received is not None:
            supervisor.stop()
        LOG.info(
            "supervising: canary every %.0f s, hang timeout %.0f s (--no-supervise to turn off)",
            policy.canary_interval_s,
            policy.hang_timeout_s,
        )
        return exit_status(supervisor.run())


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Entry point of ``python -m server``; returns the process exit status."""
    config, args = parse_config(
        sys.argv[1:] if argv is None else argv, os.environ if environ is None else environ
    )
    logging.basicConfig(
        level=logging.INFO,
        format="[launcher] %(asctime)s.%(msecs)03d %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if config.base_model is None:
        LOG.warning("no --base-model / BASE_MODEL given: models that need a base model will fail to load")
    try:
        config = with_merged_variants(config, args.merged)
    except Exception as exc:  # MergeError, TemplateError, LaunchError: say why and stop before launching
        print(f"error: cannot build the merged variants: {exc}", file=sys.stderr)
        return EXIT_LAUNCH_ERROR
    return run(config, args.ready_timeout, args.merged, health_policy(args))
