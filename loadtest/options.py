"""The load test's command-line options, declared once for both parsers that read them.

The same `add_*` functions extend Locust's parser (in the locustfile, via `events.init_command_line_parser`)
and `python -m loadtest`'s, which validates them before starting anything and hands them to Locust again
through `traffic_argv`; `traffic_config(traffic_argv(c)) == c` is what keeps the two in step.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from loadtest.traffic import (
    DEMO_ACCURACY_FILE,
    DEMO_TASKS_FILE,
    MISS_DTYPES,
    MaxTokensMix,
    Popularity,
    Sampling,
    TrafficConfig,
)

DEFAULT_REQUEST_TIMEOUT_S = 60.0
_DEFAULT = TrafficConfig()


def add_traffic_arguments(parser: Any) -> None:
    """The traffic shape options (argparse or Locust's configargparse parser)."""
    group = parser.add_argument_group("traffic shape (python -m loadtest / loadtest/locustfile.py)")
    group.add_argument(
        "--adapters",
        default=None,
        help="comma-separated adapter ids to load, in popularity rank order (default: every adapter in the "
        "tasks file, in its order)",
    )
    group.add_argument(
        "--popularity",
        default=str(_DEFAULT.popularity),
        help="how requests spread over the adapters: uniform, zipf:S (rank r gets 1/r^S) or hot:K:SHARE "
        "(the first K adapters get SHARE of the adapter traffic) (default: %(default)s)",
    )
    group.add_argument(
        "--base-share",
        type=float,
        default=None,
        help="share of requests for the bare base (adapter_id ''; its task is echo) (default: 1/(N+1))",
    )
    group.add_argument(
        "--prompt-lengths",
        default=None,
        help="MIN-MAX prompt length in characters; lengths are drawn uniformly (default: the tasks file's)",
    )
    group.add_argument(
        "--max-tokens-mix",
        default=str(_DEFAULT.max_tokens),
        help="OMIT:TRUNCATE:AMPLE weights: max_tokens not sent, 1..len(answer), len(answer)+1..+16 "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--default-max-tokens",
        type=int,
        default=_DEFAULT.default_max_tokens,
        help="the server's default_max_tokens, for requests not sending max_tokens (default: %(default)s)",
    )
    group.add_argument(
        "--sampled-share",
        type=float,
        default=_DEFAULT.sampling.share,
        help="share of sampled requests (temperature > 0), checked to reproduce (default: %(default)s)",
    )
    group.add_argument("--temperature", type=float, default=_DEFAULT.sampling.temperature)
    group.add_argument("--top-p", type=float, default=_DEFAULT.sampling.top_p)
    group.add_argument("--top-k", type=int, default=_DEFAULT.sampling.top_k)
    group.add_argument(
        "--seeds",
        type=int,
        default=_DEFAULT.sampling.seeds,
        help="sampled requests use seeds 0..N-1 (default: %(default)s)",
    )
    group.add_argument(
        "--sampled-prompts",
        type=int,
        default=_DEFAULT.sampling.prompts,
        help="sampled requests use the first N prompts of each adapter, so they recur (default: %(default)s)",
    )
    group.add_argument("--traffic-seed", type=int, default=_DEFAULT.seed, help="seeds every user's draws")
    group.add_argument("--tasks-file", default=str(DEMO_TASKS_FILE), help="adapter id -> task (JSON)")
    group.add_argument(
        "--accuracy-file",
        default=str(DEMO_ACCURACY_FILE),
        help="the model's own misses, left out of the prompts ('' for none)",
    )
    group.add_argument("--miss-dtype", default=_DEFAULT.miss_dtype, choices=MISS_DTYPES)
    group.add_argument(
        "--task-override",
        default="",
        help="FOR SELF-TESTS ONLY: ADAPTER=TASK[,...] tells the oracle a wrong task, so the run must fail",
    )


def add_target_arguments(parser: Any) -> None:
    """Where the users send their requests, and where the Locust process writes its ledger and summary."""
    group = parser.add_argument_group("target and report (loadtest/locustfile.py)")
    group.add_argument("--triton-http", default="127.0.0.1:8000", help="Triton HTTP endpoint, host:port")
    group.add_argument("--triton-grpc", default="127.0.0.1:8001", help="Triton gRPC endpoint, host:port")
    group.add_argument(
        "--request-timeout",
        type=float,
        default=DEFAULT_REQUEST_TIMEOUT_S,
        help="seconds before a request counts as DEADLINE_EXCEEDED (default: %(default)s)",
    )
    group.add_argument("--think-time", type=float, default=0.0, help="seconds a user waits between requests")
    group.add_argument("--report-dir", default="", help="where to write ledger.json and summary.json/.md")
    group.add_argument("--run-id", default="run", help="prefix of every request id of the run")


def _lengths(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        if not sep:
            raise ValueError
        return int(low), int(high)
    except ValueError:
        raise ValueError(f"prompt lengths {text!r}: expected MIN-MAX") from None


def _overrides(text: str) -> tuple[tuple[str, str], ...]:
    overrides = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        adapter_id, sep, task = item.partition("=")
        if not sep or not task:
            raise ValueError(f"task override {item!r}: expected ADAPTER=TASK")
        overrides.append((adapter_id, task))
    return tuple(overrides)


def traffic_config(namespace: argparse.Namespace) -> TrafficConfig:
    """The TrafficConfig the options describe; ValueError says what is wrong."""
    adapters = None
    if namespace.adapters is not None:
        adapters = tuple(filter(None, (a.strip() for a in namespace.adapters.split(","))))
    return TrafficConfig(
        adapters=adapters,
        popularity=Popularity.parse(namespace.popularity),
        base_share=namespace.base_share,
        prompt_lengths=None if namespace.prompt_lengths is None else _lengths(namespace.prompt_lengths),
        max_tokens=MaxTokensMix.parse(namespace.max_tokens_mix),
        default_max_tokens=namespace.default_max_tokens,
        sampling=Sampling(
            share=namespace.sampled_share,
            temperature=namespace.temperature,
            top_p=namespace.top_p,
            top_k=namespace.top_k,
            seeds=namespace.seeds,
            prompts=namespace.sampled_prompts,
        ),
        seed=namespace.traffic_seed,
        task_overrides=_overrides(namespace.task_override),
        tasks_file=Path(namespace.tasks_file),
        accuracy_file=Path(namespace.accuracy_file) if namespace.accuracy_file else None,
        miss_dtype=namespace.miss_dtype,
    )


def traffic_argv(config: TrafficConfig) -> list[str]:
    """The options that describe `config` (the inverse of `traffic_config`)."""
    argv = []
    if config.adapters is not None:
        argv += ["--adapters", ",".join(config.adapters)]
    argv += ["--popularity", str(config.popularity)]
    if config.base_share is not None:
        argv += ["--base-share", repr(config.base_share)]
    if config.prompt_lengths is not None:
        argv += ["--prompt-lengths", f"{config.prompt_lengths[0]}-{config.prompt_lengths[1]}"]
    sampling = config.sampling
    argv += [
        "--max-tokens-mix",
        str(config.max_tokens),
        "--default-max-tokens",
        str(config.default_max_tokens),
        "--sampled-share",
        repr(sampling.share),
        "--temperature",
        repr(sampling.temperature),
        "--top-p",
        repr(sampling.top_p),
        "--top-k",
        str(sampling.top_k),
        "--seeds",
        str(sampling.seeds),
        "--sampled-prompts",
        str(sampling.prompts),
        "--traffic-seed",
        str(config.seed),
        "--tasks-file",
        str(config.tasks_file),
        "--accuracy-file",
        "" if config.accuracy_file is None else str(config.accuracy_file),
        "--miss-dtype",
        config.miss_dtype,
    ]
    if config.task_overrides:
        argv += ["--task-override", ",".join(f"{a}={t}" for a, t in config.task_overrides)]
    return argv
