"""The adapter bank against a merged-weight variant of one adapter, side by side on one server.

`compare_paths` sends the same prompts to `generate` (with the adapter's id) and to
`generate_merged_<id>`, in alternating rounds under the same concurrency, and measures answer agreement,
p50 / p95 latency, throughput and the resident memory of the process serving each path. `offline_check`
loads both models in-process (the bank and the merged weights) and reports greedy token agreement and the
largest logit difference, which the server does not expose.
"""

from __future__ import annotations

import math
import random
import re
import string
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.api import AdapterClient, GenerateRequest, GenerateResult, RequestFailed
from client.cli import percentile

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BANK_ENSEMBLE = "generate"
BANK_MODEL = "generate_stream"
PROMPT_ALPHABET = string.ascii_lowercase + " "


def merged_ensemble(adapter_id: str) -> str:
    return f"generate_merged_{adapter_id}"


def merged_model(adapter_id: str) -> str:
    return f"merged_{adapter_id}"


def random_prompts(n: int, seed: int = 0, max_len: int = 24) -> list[str]:
    """``n`` prompts over lowercase letters and spaces (the demo's domain), 1-``max_len`` characters."""
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n:
        text = "".join(rng.choice(PROMPT_ALPHABET) for _ in range(rng.randint(1, max_len)))
        if text.strip():
            prompts.append(text)
    return prompts


@dataclass
class PathStats:
    """What one path served over every round: latencies of its answers, failures, time spent."""

    label: str
    ensemble: str
    token_model: str
    latencies_s: list[float] = field(default_factory=list)
    failures: list[RequestFailed] = field(default_factory=list)
    wall_s: float = 0.0
    rss_bytes: int | None = None

    @property
    def requests(self) -> int:
        """Requests sent in the measured rounds: each got one answer or one failure."""
        return len(self.latencies_s) + len(self.failures)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_s, 50) * 1e3

    @property
    def p95_ms(self) -> float:
        return percentile(self.latencies_s, 95) * 1e3

    @property
    def throughput(self) -> float:
        """Requests answered per second of wall time."""
        return len(self.latencies_s) / self.wall_s if self.wall_s > 0 else math.nan


@dataclass
class Comparison:
    adapter_id: str
    prompts: list[str]
    bank: PathStats
    merged: PathStats
    bank_answers: list[str | None]
    merged_answers: list[str | None]
    versions: tuple[set[str], set[str]]

    @property
    def agreeing(self) -> int:
        return sum(
            a is not None and a == b for a, b in zip(self.bank_answers, self.merged_answers, strict=True)
        )


def compare_paths(
    url: str | None,
    protocol: str,
    adapter_id: str,
    prompts: Sequence[str],
    *,
    concurrency: int = 16,
    rounds: int = 3,
    max_tokens: int | None = None,
    timeout_s: float = 120.0,
) -> Comparison:
    """Send ``prompts`` to both paths, alternating: warm-up, then ``rounds`` rounds of (bank, merged).

    Answers of the first measured round are compared; latencies and wall time add up over the rounds.
    """
    bank = PathStats("adapter bank", BANK_ENSEMBLE, BANK_MODEL)
    merged = PathStats("merged weights", merged_ensemble(adapter_id), merged_model(adapter_id))
    answers: dict[str, list[str | None]] = {}
    versions: dict[str, set[str]] = {}
    clients = {
        stats.ensemble: AdapterClient(url, protocol=protocol, model=stats.ensemble, timeout_s=timeout_s)
        for stats in (bank, merged)
    }
    try:
        for client in clients.values():
            reason = client.not_ready_reason()
            if reason is not None:
                raise RuntimeError(reason)
        requests = [GenerateRequest(p, adapter_id, max_tokens=max_tokens) for p in prompts]
        for stats in (bank, merged):  # warm-up: load paths, fill caches; not measured
            clients[stats.ensemble].generate_many(requests[: 2 * concurrency], concurrency=concurrency)
        for round_index in range(rounds):
            for stats in (bank, merged) if round_index % 2 == 0 else (merged, bank):
                start = time.perf_counter()
                outcomes = clients[stats.ensemble].generate_many(requests, concurrency=concurrency)
                stats.wall_s += time.perf_counter() - start
                for outcome in outcomes:
                    if isinstance(outcome, GenerateResult):
                        stats.latencies_s.append(outcome.latency_s)
                    else:
                        stats.failures.append(outcome)
                if stats.ensemble not in answers:
                    answers[stats.ensemble] = [
                        o.text if isinstance(o, GenerateResult) else None for o in outcomes
                    ]
                    versions[stats.ensemble] = {
                        o.adapter_version for o in outcomes if isinstance(o, GenerateResult)
                    }
    finally:
        for client in clients.values():
            client.close()
    for stats in (bank, merged):
        stats.rss_bytes = serving_process_rss(stats.token_model)
    return Comparison(
        adapter_id,
        list(prompts),
        bank,
        merged,
        answers[bank.ensemble],
        answers[merged.ensemble],
        (versions[bank.ensemble], versions[merged.ensemble]),
    )


def serving_process_rss(
    model_name: str, server_pid: int | None = None, proc: Path = Path("/proc")
) -> int | None:
    """Resident bytes of the Triton Python-backend stub(s) serving ``model_name`` on this machine.

    A stub's command line holds its model's path, ``.../<model_name>/<version>/model.py``, and its parent is
    the tritonserver that started it. With ``server_pid`` only that server's stubs count; without it, stubs
    of more than one server make the answer ambiguous. None when no (or no unambiguous) stub is visible
    here: a remote server, several local ones, or no /proc.
    """
    path = re.compile(rb"/" + re.escape(model_name.encode()) + rb"/[0-9]+/model\.py(\x00|$)")
    rss_by_parent: dict[int, int] = {}
    for entry in proc.glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes()
            if b"triton_python_backend_stub" not in cmdline or not path.search(cmdline):
                continue
            status = dict(
                line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line
            )
            parent, rss_kib = int(status["PPid"]), int(status["VmRSS"].split()[0])
        except (OSError, KeyError, ValueError):
            continue
        rss_by_parent[parent] = rss_by_parent.get(parent, 0) + rss_kib * 1024
    if server_pid is not None:
        return rss_by_parent.get(server_pid)
    return next(iter(rss_by_parent.values())) if len(rss_by_parent) == 1 else None


@dataclass(frozen=True)
class OfflineCheck:
    """Greedy tokens of the bank and of the merged weights, in-process, and their largest logit gap."""

    tokens_agreeing: int
    tokens_total: int
    answers_identical: int
    prompts: int
    max_logit_diff: float


def offline_check(
    base_model: Path,
    adapter_dir: Path,
    merged_dir: Path,
    adapter_id: str,
    prompts: Sequence[str],
    max_tokens: int,
) -> OfflineCheck:
    """Load the bank (base + adapters) and the merged model in this process; compare greedy tokens and
    the logits of the bank's answers (prompt + answer, teacher-forced) under both."""
    backend_src = PROJECT_ROOT / "backend_src"
    if str(backend_src) not in sys.path:
        sys.path.insert(0, str(backend_src))
    from multiadapter.config import EngineConfig
    from multiadapter.engine import Engine, GenerationRequest, GenerationResult
    from multiadapter.tokenization import TextCodec

    codec = TextCodec.load(base_model)
    bank = Engine.load(EngineConfig(base_model=base_model, adapter_dir=adapter_dir))
    merged = Engine.load(EngineConfig(base_model=merged_dir, merged=True))
    ids = [codec.encode(p.encode()) for p in prompts]
    ours = bank.generate([GenerationRequest(i, adapter_id, max_tokens=max_tokens) for i in ids])
    theirs = merged.generate([GenerationRequest(i, adapter_id, max_tokens=max_tokens) for i in ids])
    failed = [o for o in (*ours, *theirs) if not isinstance(o, GenerationResult)]
    if failed:
        raise ValueError(f"{len(failed)} offline generations failed, first: {failed[0]}")
    agreeing = total = identical = 0
    for a, b in zip(ours, theirs, strict=True):
        a_ids, b_ids = a.output_ids, b.output_ids
        total += max(len(a_ids), len(b_ids))
        agreeing += sum(x == y for x, y in zip(a_ids, b_ids, strict=False))
        identical += a_ids == b_ids
    sequences = [list(i) + list(o.output_ids) for i, o in zip(ids, ours, strict=True)]
    bank_logits, batch = bank.logits(sequences, [adapter_id] * len(sequences))
    merged_logits, _ = merged.logits(sequences, [adapter_id] * len(sequences))
    real = batch.attention_mask.bool()
    gap = (bank_logits.float() - merged_logits.float()).abs()[real].max().item()
    return OfflineCheck(agreeing, total, identical, len(prompts), gap)


def format_report(comparison: Comparison, concurrency: int, offline: OfflineCheck | None) -> str:
    """A Markdown table of both paths, then agreement lines."""

    def mib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / 2**20:.0f}"

    lines = [
        f"adapter `{comparison.adapter_id}`, {len(comparison.prompts)} prompts per round, "
        f"concurrency {concurrency}, rounds alternate the two paths",
        "",
        "| path | Triton model | answered | p50 ms | p95 ms | throughput req/s | serving process RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for stats in (comparison.bank, comparison.merged):
        lines.append(
            f"| {stats.label} | `{stats.ensemble}` | {len(stats.latencies_s)} / {stats.requests} | "
            f"{stats.p50_ms:.1f} | {stats.p95_ms:.1f} | {stats.throughput:.1f} | {mib(stats.rss_bytes)} |"
        )
    bank, merged = comparison.bank, comparison.merged
    lines += [
        "",
        f"identical answers: {comparison.agreeing} / {len(comparison.prompts)}",
        f"adapter_version: bank {sorted(comparison.versions[0])}, merged {sorted(comparison.versions[1])}",
        f"merged / bank: throughput {_ratio(merged.throughput, bank.throughput)}, "
        f"p50 latency {_ratio(merged.p50_ms, bank.p50_ms)}",
    ]
    if offline is not None:
        lines.append(
            f"offline: greedy tokens agree {offline.tokens_agreeing} / {offline.tokens_total}, "
            f"answers identical {offline.answers_identical} / {offline.prompts}, "
            f"max |logit difference| {offline.max_logit_diff:.2e}"
        )
    for stats in (bank, merged):
        for failure in stats.failures[:3]:
            lines.append(f"{stats.ensemble} failed: {failure.code}: {failure.message}")
    return "\n".join(lines)


def _ratio(numerator: float, denominator: float) -> str:
    """``a / b`` as "1.23x", or "n/a" when either side has no finite, positive value."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return "n/a"
    return f"{numerator / denominator:.2f}x"


ADAPTER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the server's rule: ids are names


def check_adapter_id(adapter_id: str) -> str:
    """``adapter_id`` if it is a name (never a path); ValueError otherwise."""
    if not ADAPTER_ID.fullmatch(adapter_id) or ".." in adapter_id:
        raise ValueError(f"invalid adapter id {adapter_id!r}: ids are names from [A-Za-z0-9._-]")
    return adapter_id


def default_merged_dir(adapter_id: str) -> Path:
    """Where `python -m tools.merge` writes the merged weights of ``adapter_id`` by default."""
    return PROJECT_ROOT / "build" / "merged" / adapter_id / "weights"
