"""What the load test sends and what must come back: the traffic shape and the oracle. Pure Python + NumPy.

Every greedy answer is checked against its adapter's task (`training.tasks`), so a request answered by the
wrong adapter under load is a failure named for the adapter it asked for. Prompts come from the held-out
evaluation set the demo's accuracy table was scored on, minus each adapter's listed misses: those are the
model's own rare errors (99.2-99.9% exact), not the server's, and would otherwise fail a clean run.

The demo tokenizer has one token per character and every task keeps the prompt's length, so the answer to
`max_tokens = k` is the first k characters of the task's answer when k <= its length, and the whole answer
(then EOS, counted in `generated_tokens`) otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.prompts import evaluation_prompts
from training.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
DEMO_TASKS_FILE = ROOT / "models" / "demo" / "tasks.json"
DEMO_ACCURACY_FILE = ROOT / "models" / "demo" / "accuracy.json"
EVALUATION_PROMPTS = 1000  # the accuracy table's prompt count; its misses refer to these prompts
AMPLE_EXTRA_TOKENS = 16  # an "ample" max_tokens is len(answer) + 1 .. len(answer) + this
MISS_DTYPES = ("float32", "bfloat16")
WRONG_ANSWER = "WRONG_ANSWER"
NOT_REPRODUCIBLE = "NOT_REPRODUCIBLE"
OK = "ok"


def _number(value: float) -> str:
    """`value` as short as it reads back exactly ("1", "0.8", "0.1234567891")."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def request_name(adapter_id: str) -> str:
    """The Locust name of an adapter's requests: `generate[upper]`, `generate[<base>]` for the bare base."""
    return f"generate[{adapter_id or '<base>'}]"


@dataclass(frozen=True)
class Popularity:
    """How requests spread over the adapters, in their listed order (rank 1 first).

    `uniform`; `zipf:S` (weight of rank r is 1 / r**S); `hot:K:SHARE` (the first K adapters share SHARE of
    the adapter traffic evenly, the rest share what is left evenly).
    """

    kind: str = "uniform"
    zipf_s: float = 1.0
    hot_count: int = 1
    hot_share: float = 0.8

    @classmethod
    def parse(cls, text: str) -> Popularity:
        kind, *params = text.strip().split(":")
        try:
            if kind == "uniform" and not params:
                return cls()
            if kind == "zipf" and len(params) == 1:
                popularity = cls("zipf", zipf_s=float(params[0]))
            elif kind == "hot" and len(params) == 2:
                popularity = cls("hot", hot_count=int(params[0]), hot_share=float(params[1]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(f"popularity {text!r}: expected uniform, zipf:S or hot:K:SHARE") from None
        problems = popularity.problems()
        if problems:
            raise ValueError(f"popularity {text!r}: {'; '.join(problems)}")
        return popularity

    def problems(self) -> list[str]:
        problems = []
        if self.kind not in ("uniform", "zipf", "hot"):
            problems.append(f"unknown kind {self.kind!r}")
        if self.kind == "zipf" and not (np.isfinite(self.zipf_s) and self.zipf_s >= 0):
            problems.append(f"zipf exponent must be finite and >= 0, got {self.zipf_s}")
        if self.kind == "hot" and self.hot_count < 1:
            problems.append(f"hot set size must be >= 1, got {self.hot_count}")
        if self.kind == "hot" and not 0 <= self.hot_share <= 1:
            problems.append(f"hot share must be in [0, 1], got {self.hot_share}")
        return problems

    def __str__(self) -> str:
        if self.kind == "zipf":
            return f"zipf:{_number(self.zipf_s)}"
        if self.kind == "hot":
            return f"hot:{self.hot_count}:{_number(self.hot_share)}"
        return "uniform"

    def weights(self, n: int) -> np.ndarray:
        """Probabilities of ranks 1..n, shape [n], summing to 1. A hot set as large as the list is uniform."""
        if n < 1:
            return np.zeros(0)
        if self.kind == "zipf":
            raw = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** self.zipf_s
        elif self.kind == "hot" and self.hot_count < n:
            raw = np.full(n, (1 - self.hot_share) / (n - self.hot_count))
            raw[: self.hot_count] = self.hot_share / self.hot_count
        else:
            raw = np.ones(n)
        return raw / raw.sum()


@dataclass(frozen=True)
class MaxTokensMix:
    """Relative weights of the three ways a request sets `max_tokens`: not sent (the server's default),
    truncating (uniform in 1 .. len(answer)), ample (uniform in len(answer) + 1 .. + AMPLE_EXTRA_TOKENS)."""

    omit: float = 1.0
    truncate: float = 1.0
    ample: float = 1.0

    @classmethod
    def parse(cls, text: str) -> MaxTokensMix:
        parts = text.split(":")
        try:
            if len(parts) != 3:
                raise ValueError
            mix = cls(*(float(part) for part in parts))
        except ValueError:
            raise ValueError(f"max_tokens mix {text!r}: expected OMIT:TRUNCATE:AMPLE weights") from None
        problems = mix.problems()
        if problems:
            raise ValueError(f"max_tokens mix {text!r}: {'; '.join(problems)}")
        return mix

    def problems(self) -> list[str]:
        weights = (self.omit, self.truncate, self.ample)
        if any(not np.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            return [f"weights must be finite, >= 0 and not all 0, got {weights}"]
        return []

    def __str__(self) -> str:
        return ":".join(_number(w) for w in (self.omit, self.truncate, self.ample))

    def probabilities(self) -> np.ndarray:
        """[omit, truncate, ample], shape [3], summing to 1."""
        weights = np.array([self.omit, self.truncate, self.ample], dtype=np.float64)
        return weights / weights.sum()


@dataclass(frozen=True)
class Sampling:
    """Sampled (temperature > 0) requests: their share of all requests and their parameters.

    A sampled answer cannot be checked against the task, so it is checked for reproducibility: its seed is
    one of `seeds` values and its prompt one of the first `prompts` of its adapter's pool, so identical
    requests recur and must get identical answers whatever shares their batch.
    """

    share: float = 0.0
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    seeds: int = 4
    prompts: int = 16

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.share <= 1:
            problems.append(f"sampled share must be in [0, 1], got {self.share}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            problems.append(f"temperature must be finite and > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            problems.append(f"top_k must be >= 0, got {self.top_k}")
        if self.seeds < 1:
            problems.append(f"seeds must be >= 1, got {self.seeds}")
        if self.prompts < 1:
            problems.append(f"sampled prompts must be >= 1, got {self.prompts}")
        return problems


@dataclass(frozen=True)
class TrafficConfig:
    """The traffic shape. None fields follow the tasks file: every adapter it lists, the base as often as
    one adapter (1 / (N + 1)), its prompt length range.

    `task_overrides` ((adapter, task), ...) tells the oracle a wrong task on purpose: for the load test's
    self-test that a wrong answer fails the run, never for real runs.
    """

    adapters: tuple[str, ...] | None = None
    popularity: Popularity = field(default_factory=Popularity)
    base_share: float | None = None
    prompt_lengths: tuple[int, int] | None = None
    max_tokens: MaxTokensMix = field(default_factory=MaxTokensMix)
    default_max_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    task_overrides: tuple[tuple[str, str], ...] = ()
    tasks_file: Path = DEMO_TASKS_FILE
    accuracy_file: Path | None = DEMO_ACCURACY_FILE
    miss_dtype: str = "float32"

    def __post_init__(self) -> None:
        problems = [*self.popularity.problems(), *self.max_tokens.problems(), *self.sampling.problems()]
        if self.adapters is not None and (
            "" in self.adapters or len(set(self.adapters)) != len(self.adapters)
        ):
            problems.append(
                f"adapters must be distinct, non-empty ids (the base is --base-share): {self.adapters}"
            )
        if self.base_share is not None and not 0 <= self.base_share <= 1:
            problems.append(f"base share must be in [0, 1], got {self.base_share}")
        if self.prompt_lengths is not None and not 1 <= self.prompt_lengths[0] <= self.prompt_lengths[1]:
            problems.append(f"prompt lengths must be 1 <= MIN <= MAX, got {self.prompt_lengths}")
        if self.default_max_tokens < 1:
            problems.append(f"default max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.miss_dtype not in MISS_DTYPES:
            problems.append(f"miss dtype must be one of {MISS_DTYPES}, got {self.miss_dtype!r}")
        for adapter_id, task in self.task_overrides:
            try:
                get_task(task)
            except KeyError as exc:
                problems.append(f"task override {adapter_id}={task}: {exc.args[0]}")
        if problems:
            raise ValueError("invalid traffic: " + "; ".join(problems))


@dataclass(frozen=True)
class DemoContract:
    """What the tasks and accuracy files say: adapter id -> task ("" = base), the prompt length range,
    and per adapter the evaluation prompts the model itself gets wrong."""

    tasks: Mapping[str, str]
    prompt_lengths: tuple[int, int]
    misses: Mapping[str, frozenset[str]]

    @classmethod
    def load(cls, tasks_file: Path, accuracy_file: Path | None, dtype: str = "float32") -> DemoContract:
        spec = json.loads(Path(tasks_file).read_text())
        tasks = {adapter_id: entry["task"] for adapter_id, entry in spec["tasks"].items()}
        lengths = (int(spec["prompts"]["min_length"]), int(spec["prompts"]["max_length"]))
        misses: dict[str, frozenset[str]] = {}
        if accuracy_file is not None:
            for row in json.loads(Path(accuracy_file).read_text())["rows"]:
                listed = row.get(dtype, {}).get("misses", [])
                misses[row["adapter_id"]] = frozenset(miss["prompt"] for miss in listed)
        return cls(tasks, lengths, misses)


@dataclass(frozen=True)
class Expectation:
    """What a greedy request must answer: the text and `generated_tokens` (a stopping EOS included)."""

    text: str
    generated_tokens: int


def expected_answer(answer: str, max_tokens: int | None, default_max_tokens: int) -> Expectation:
    """The answer to a request with `max_tokens` (None: not sent, the server's default applies), given the
    task's full `answer`: its first k characters when k <= len(answer) (stopped by max_tokens, no EOS),
    else all of it followed by EOS."""
    k = default_max_tokens if max_tokens is None else max_tokens
    if k <= len(answer):
        return Expectation(answer[:k], k)
    return Expectation(answer, len(answer) + 1)


@dataclass(frozen=True)
class PlannedRequest:
    """One request to send and what must come back: `expected` for greedy requests, None for sampled ones
    (checked for reproducibility instead)."""

    adapter_id: str
    prompt: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    expected: Expectation | None = None

    @property
    def name(self) -> str:
        return request_name(self.adapter_id)

    @property
    def sampled(self) -> bool:
        return self.temperature is not None and self.temperature > 0

    def reproducibility_key(self) -> tuple[object, ...]:
        return (
            self.adapter_id,
            self.prompt,
            self.seed,
            self.temperature,
            self.top_p,
            self.top_k,
            self.max_tokens,
        )


@dataclass(frozen=True)
class Answer:
    """What the server sent back for one request."""

    text: str
    adapter_id: str
    generated_tokens: int


@dataclass(frozen=True)
class Verdict:
    """`kind` is OK, WRONG_ANSWER or NOT_REPRODUCIBLE; `detail` says what differed."""

    kind: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == OK


class ReproducibilityMemo:
    """The first answer to each distinct sampled request of this process; later identical ones must match."""

    def __init__(self) -> None:
        self._first: dict[tuple[object, ...], Answer] = {}

    def __len__(self) -> int:
        return len(self._first)

    def first(self, key: tuple[object, ...], answer: Answer) -> Answer:
        """The first answer recorded for `key`, recording `answer` if it is the first."""
        return self._first.setdefault(key, answer)


def check(planned: PlannedRequest, answer: Answer, memo: ReproducibilityMemo) -> Verdict:
    """Whether `answer` is right for `planned`: the adapter echoed, and then the task's text and token count
    (greedy) or the first answer to the identical request (sampled)."""
    if answer.adapter_id != planned.adapter_id:
        return Verdict(WRONG_ANSWER, f"served by adapter {answer.adapter_id!r}")
    if planned.expected is not None:
        expected = planned.expected
        if answer.text != expected.text:
            return Verdict(
                WRONG_ANSWER,
                f"prompt {planned.prompt!r} max_tokens {planned.max_tokens}: "
                f"expected {expected.text!r}, got {answer.text!r}",
            )
        if answer.generated_tokens != expected.generated_tokens:
            return Verdict(
                WRONG_ANSWER,
                f"prompt {planned.prompt!r} max_tokens {planned.max_tokens}: "
                f"generated_tokens {answer.generated_tokens}, expected {expected.generated_tokens}",
            )
        return Verdict(OK)
    if planned.max_tokens is not None and answer.generated_tokens > planned.max_tokens:
        return Verdict(
            WRONG_ANSWER, f"generated_tokens {answer.generated_tokens} over max_tokens {planned.max_tokens}"
        )
    first = memo.first(planned.reproducibility_key(), answer)
    if first != answer:
        return Verdict(
            NOT_REPRODUCIBLE,
            f"prompt {planned.prompt!r} seed {planned.seed}: first {first.text!r}, now {answer.text!r}",
        )
    return Verdict(OK)


@dataclass(frozen=True)
class _PromptPool:
    """One adapter's prompts by length; a length is drawn uniformly, then a prompt of that length."""

    by_length: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, prompts: list[str]) -> _PromptPool:
        groups: dict[int, list[str]] = {}
        for prompt in prompts:
            groups.setdefault(len(prompt), []).append(prompt)
        return cls(tuple(tuple(groups[length]) for length in sorted(groups)))

    def prompts(self) -> list[str]:
        return [prompt for group in self.by_length for prompt in group]

    def draw(self, rng: np.random.Generator) -> str:
        group = self.by_length[int(rng.integers(len(self.by_length)))]
        return group[int(rng.integers(len(group)))]


class TrafficPlan:
    """Draws the requests of a run: adapter by popularity (the base by its share), prompt, max_tokens,
    sampling, each with what it must answer. Built once per process; `draw` is called per request with the
    calling user's generator."""

    def __init__(self, config: TrafficConfig, contract: DemoContract) -> None:
        self.config = config
        unknown = sorted(set(config.adapters or ()) - set(contract.tasks))
        unknown += [f"{a} (override)" for a, _ in config.task_overrides if a not in contract.tasks]
        if unknown:
            raise ValueError(f"adapters not in the tasks file: {', '.join(unknown)}")
        self.tasks = {**contract.tasks, **dict(config.task_overrides)}
        adapters = config.adapters if config.adapters is not None else tuple(a for a in contract.tasks if a)
        base_share = config.base_share if config.base_share is not None else 1 / (len(adapters) + 1)
        if not adapters:
            base_share = 1.0
        if base_share > 0 and "" not in contract.tasks:
            raise ValueError("the tasks file has no task for the base (adapter id '')")
        weights = [base_share, *((1 - base_share) * config.popularity.weights(len(adapters)))]
        targets = ["", *adapters]
        self.targets = tuple(t for t, w in zip(targets, weights, strict=True) if w > 0)
        self.probabilities = np.array([w for w in weights if w > 0]) / sum(weights)
        low, high = config.prompt_lengths or contract.prompt_lengths
        evaluation = evaluation_prompts(EVALUATION_PROMPTS)
        self.pools: dict[str, _PromptPool] = {}
        self.sampled_pools: dict[str, _PromptPool] = {}
        for target in self.targets:
            misses = contract.misses.get(target, frozenset())
            prompts = [p for p in evaluation if low <= len(p) <= high and p not in misses]
            if not prompts:
                raise ValueError(f"no evaluation prompt of length {low}-{high} for {request_name(target)}")
            self.pools[target] = _PromptPool.of(prompts)
            self.sampled_pools[target] = _PromptPool.of(prompts[: config.sampling.prompts])
        self._max_tokens_p = config.max_tokens.probabilities()

    def answer(self, adapter_id: str, prompt: str) -> str:
        """The oracle: the full answer of the adapter's task."""
        return get_task(self.tasks[adapter_id]).apply(prompt)

    def draw(self, rng: np.random.Generator) -> PlannedRequest:
        target = self.targets[int(rng.choice(len(self.targets), p=self.probabilities))]
        sampling = self.config.sampling
        sampled = sampling.share > 0 and rng.random() < sampling.share
        prompt = (self.sampled_pools if sampled else self.pools)[target].draw(rng)
        answer = self.answer(target, prompt)
        mode = int(rng.choice(3, p=self._max_tokens_p))
        if mode == 0:
            max_tokens = None
        elif mode == 1:
            max_tokens = int(rng.integers(1, len(answer) + 1))
        else:
            max_tokens = int(rng.integers(len(answer) + 1, len(answer) + AMPLE_EXTRA_TOKENS + 1))
        if sampled:
            return PlannedRequest(
                target,
                prompt,
                max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=sampling.top_k,
                seed=int(rng.integers(sampling.seeds)),
            )
        return PlannedRequest(
            target,
            prompt,
            max_tokens,
            expected=expected_answer(answer, max_tokens, self.config.default_max_tokens),
        )

    @classmethod
    def load(cls, config: TrafficConfig) -> TrafficPlan:
        return cls(config, DemoContract.load(config.tasks_file, config.accuracy_file, config.miss_dtype))
