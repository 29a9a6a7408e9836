"""The request ledger: every request sent gets exactly one outcome, or the run says which did not.

A load test that loses requests (a user killed mid-request, an exception swallowed, an outcome recorded
twice) would report clean numbers over an unknown subset. Each Locust process keeps a `Ledger`; its
`LedgerSnapshot`s are plain data, merged on the master in distributed mode, and `reconcile` decides whether
sent = ok + failures holds with nothing missing and nothing twice.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

OK = "ok"
EXAMPLES_KEPT = 20  # request ids kept per anomaly, to name a few in the report


@dataclass(frozen=True)
class Tally:
    """One request name's counts: sent, outcomes by kind (OK, an error code, WRONG_ANSWER, ...), and the
    tokens and UTF-8 bytes of the answers."""

    sent: int = 0
    outcomes: Mapping[str, int] = field(default_factory=dict)
    tokens: int = 0
    response_bytes: int = 0
    # Time to first token of each streamed answer, in milliseconds (empty for requests answered once).
    first_token_ms: tuple[float, ...] = ()

    @property
    def settled(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        return self.outcomes.get(OK, 0)

    @property
    def failures(self) -> int:
        return self.settled - self.ok

    def plus(self, other: Tally) -> Tally:
        return Tally(
            self.sent + other.sent,
            dict(Counter(self.outcomes) + Counter(other.outcomes)),
            self.tokens + other.tokens,
            self.response_bytes + other.response_bytes,
            self.first_token_ms + other.first_token_ms,
        )


@dataclass(frozen=True)
class Anomaly:
    """How many requests broke the ledger one way, with a few of their ids."""

    count: int = 0
    examples: tuple[str, ...] = ()

    def plus(self, other: Anomaly) -> Anomaly:
        return Anomaly(self.count + other.count, (self.examples + other.examples)[:EXAMPLES_KEPT])


ANOMALIES = {
    "missing": "sent without an outcome",
    "duplicate_sends": "sent twice under one id",
    "duplicate_outcomes": "given a second outcome",
    "unknown_outcomes": "given an outcome without being sent",
}


@dataclass(frozen=True)
class LedgerSnapshot:
    """A ledger's state as plain data: per-name tallies, anomalies, the time window (epoch seconds of the
    first send and the last outcome), and whether the process had stopped sending (`final`)."""

    tallies: Mapping[str, Tally] = field(default_factory=dict)
    anomalies: Mapping[str, Anomaly] = field(default_factory=dict)
    first_sent: float | None = None
    last_settled: float | None = None
    final: bool = False

    @property
    def total(self) -> Tally:
        total = Tally()
        for tally in self.tallies.values():
            total = total.plus(tally)
        return total

    @property
    def duration_s(self) -> float:
        if self.first_sent is None or self.last_settled is None:
            return 0.0
        return max(0.0, self.last_settled - self.first_sent)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tallies": {
                name: {
                    "sent": t.sent,
                    "outcomes": dict(t.outcomes),
                    "tokens": t.tokens,
                    "response_bytes": t.response_bytes,
                    "first_token_ms": list(t.first_token_ms),
                }
                for name, t in sorted(self.tallies.items())
            },
            "anomalies": {
                kind: {"count": a.count, "examples": list(a.examples)} for kind, a in self.anomalies.items()
            },
            "first_sent": self.first_sent,
            "last_settled": self.last_settled,
            "final": self.final,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerSnapshot:
        return cls(
            tallies={
                name: Tally(
                    t["sent"],
                    dict(t["outcomes"]),
                    t["tokens"],
                    t["response_bytes"],
                    tuple(t.get("first_token_ms", ())),
                )
                for name, t in data["tallies"].items()
            },
            anomalies={
                kind: Anomaly(a["count"], tuple(a["examples"])) for kind, a in data["anomalies"].items()
            },
            first_sent=data["first_sent"],
            last_settled=data["last_settled"],
            final=data["final"],
        )


def merge(snapshots: Iterable[LedgerSnapshot]) -> LedgerSnapshot:
    """One snapshot of several processes' ledgers (final only if every one is)."""
    snapshots = list(snapshots)
    tallies: dict[str, Tally] = {}
    anomalies: dict[str, Anomaly] = {}
    for snapshot in snapshots:
        for name, tally in snapshot.tallies.items():
            tallies[name] = tallies.get(name, Tally()).plus(tally)
        for kind, anomaly in snapshot.anomalies.items():
            anomalies[kind] = anomalies.get(kind, Anomaly()).plus(anomaly)
    firsts = [s.first_sent for s in snapshots if s.first_sent is not None]
    lasts = [s.last_settled for s in snapshots if s.last_settled is not None]
    return LedgerSnapshot(
        tallies,
        anomalies,
        min(firsts) if firsts else None,
        max(lasts) if lasts else None,
        final=bool(snapshots) and all(s.final for s in snapshots),
    )


class Ledger:
    """One process's ledger. `sent` before a request goes out, `settled` once with its outcome.

    Ids of settled requests are kept (a set of strings) so that a second outcome is caught, not counted.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._pending: dict[str, str] = {}  # request id -> name
        self._settled: set[str] = set()
        self._sent: Counter[str] = Counter()
        self._outcomes: dict[str, Counter[str]] = {}
        self._tokens: Counter[str] = Counter()
        self._bytes: Counter[str] = Counter()
        self._first_token_ms: dict[str, list[float]] = {}
        self._anomalies: dict[str, list[str]] = {kind: [] for kind in ANOMALIES if kind != "missing"}
        self._anomaly_counts: Counter[str] = Counter()
        self._first_sent: float | None = None
        self._last_settled: float | None = None
        self.final = False

    def _anomaly(self, kind: str, request_id: str) -> None:
        self._anomaly_counts[kind] += 1
        if len(self._anomalies[kind]) < EXAMPLES_KEPT:
            self._anomalies[kind].append(request_id)

    def sent(self, request_id: str, name: str) -> None:
        if request_id in self._pending or request_id in self._settled:
            self._anomaly("duplicate_sends", request_id)
            return
        if self._first_sent is None:
            self._first_sent = self._clock()
        self._pending[request_id] = name
        self._sent[name] += 1

    def settled(
        self,
        request_id: str,
        outcome: str,
        tokens: int = 0,
        response_bytes: int = 0,
        first_token_ms: float | None = None,
    ) -> None:
        name = self._pending.pop(request_id, None)
        if name is None:
            kind = "duplicate_outcomes" if request_id in self._settled else "unknown_outcomes"
            self._anomaly(kind, request_id)
            return
        self._settled.add(request_id)
        self._outcomes.setdefault(name, Counter())[outcome] += 1
        self._tokens[name] += tokens
        self._bytes[name] += response_bytes
        if first_token_ms is not None:
            self._first_token_ms.setdefault(name, []).append(first_token_ms)
        self._last_settled = self._clock()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def snapshot(self) -> LedgerSnapshot:
        """The ledger now; requests still pending count as missing (meaningful once `final`)."""
        names = set(self._sent) | set(self._outcomes)
        tallies = {
            name: Tally(
                self._sent[name],
                dict(self._outcomes.get(name, {})),
                self._tokens[name],
                self._bytes[name],
                tuple(self._first_token_ms.get(name, ())),
            )
            for name in names
        }
        anomalies = {
            kind: Anomaly(self._anomaly_counts[kind], tuple(ids)) for kind, ids in self._anomalies.items()
        }
        anomalies["missing"] = Anomaly(len(self._pending), tuple(list(self._pending)[:EXAMPLES_KEPT]))
        return LedgerSnapshot(tallies, anomalies, self._first_sent, self._last_settled, self.final)


@dataclass(frozen=True)
class Reconciliation:
    """sent = ok + failures (by kind), and what broke the ledger; `clean` when nothing did."""

    sent: int
    ok: int
    failures: Mapping[str, int]
    problems: tuple[str, ...]

    @property
    def clean(self) -> bool:
        return not self.problems

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def line(self) -> str:
        failures = ", ".join(f"{kind} {n}" for kind, n in sorted(self.failures.items())) or "none"
        status = "clean" if self.clean else "MISMATCH: " + "; ".join(self.problems)
        return (
            f"ledger: sent {self.sent} = ok {self.ok} + failed {self.failed} (failures: {failures}); {status}"
        )


def reconcile(snapshot: LedgerSnapshot) -> Reconciliation:
    """Check the ledger's books: every request settled once, per name and in total, nothing unknown."""
    total = snapshot.total
    failures = {kind: n for kind, n in total.outcomes.items() if kind != OK}
    problems = []
    if not snapshot.final:
        problems.append("the ledger was not closed (the run did not stop cleanly)")
    for kind, meaning in ANOMALIES.items():
        anomaly = snapshot.anomalies.get(kind, Anomaly())
        if anomaly.count:
            examples = ", ".join(anomaly.examples[:5])
            problems.append(f"{anomaly.count} request(s) {meaning} (e.g. {examples})")
    for name, tally in sorted(snapshot.tallies.items()):
        if tally.sent != tally.settled:
            problems.append(f"{name}: sent {tally.sent}, settled {tally.settled}")
    return Reconciliation(total.sent, total.ok, failures, tuple(problems))
