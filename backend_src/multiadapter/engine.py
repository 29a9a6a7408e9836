"""The engine: one frozen base model, its adapter bank, and continuous batching over mixed requests.

`Engine.submit` validates one request and hands it to the engine loop (its own thread, `loop.py`), which
admits it into the running batch at the next step and tells its listener about every token and the end.
`Engine.generate` takes a list of requests and returns one outcome per request, in order: a result, or the
RequestError that failed that request alone. Rows of every adapter and the bare base share each step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .adapter_format import BOTTLENECK, adapter_format
from .adapter_ids import check_adapter_id
from .adapter_manager import AdapterManager
from .adapter_store import Adapter, AdapterStore
from .bank import BASE_ENTRY, BASE_SLOT, AdapterBank, BankEntry
from .base_model import ModuleInfo, bottleneck_layout, context_window, describe_modules, load_base_model
from .bottleneck_loading import load_bottleneck_adapter
from .config import DTYPES, EngineConfig
from .errors import InvalidRequest, RequestError, Unavailable
from .generation import Batch, RowRequest, forward_logits, generate_rows, left_pad
from .loop import EngineLoop, SequenceListener, TorchThread
from .lora_loading import load_lora_adapter
from .merged_variant import MergedInfo
from .quantization import DELTA_DTYPE, NONE, QuantizedBase, version_tag
from .sampling import SamplingParams
from .scheduler import ERROR as LOOP_ERROR
from .scheduler import Scheduler, SchedulerLimits, StepResult
from .scheduler import Sequence as LoopSequence
from .tenants import TenantPolicyFile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """One request at token level. Optional sampling fields are None when the client left them out."""

    input_ids: Sequence[int]
    adapter_id: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    tenant_id: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    """Generated token ids and the adapter (id and content version) that produced them."""

    output_ids: list[int]
    adapter_id: str
    adapter_version: str
    finish_reason: str


@dataclass(eq=False)
class Submitted:
    """A request in the loop: its sequence (tokens so far, finish reason) and the adapter serving it
    (None while that adapter loads: set before the sequence joins the loop)."""

    seq: LoopSequence
    entry: BankEntry | None
    adapter_id: str = ""

    def result(self) -> GenerationResult:
        assert self.entry is not None
        return GenerationResult(
            list(self.seq.tokens), self.entry.adapter_id, self.entry.version, self.seq.finish_reason
        )


class _Releasing:
    """Passes a sequence's events on, and releases its adapter when it finishes."""

    def __init__(self, adapters: AdapterManager, item: Submitted, listener: SequenceListener) -> None:
        self._adapters = adapters
        self._item = item
        self._listener = listener

    def on_tokens(self, seq: LoopSequence, tokens: list[int]) -> None:
        self._listener.on_tokens(seq, tokens)

    def on_finish(self, seq: LoopSequence, error: Exception | None) -> None:
        if self._item.entry is not None:
            self._adapters.release(self._item.entry)
        self._listener.on_finish(seq, error)


class _Collector:
    """A listener that lets `generate` wait for its sequences; errors by sequence."""

    def __init__(self) -> None:
        self.errors: dict[int, Exception] = {}
        self._done = 0
        self._cond = threading.Condition()

    def on_tokens(self, seq: LoopSequence, tokens: list[int]) -> None:
        pass

    def on_finish(self, seq: LoopSequence, error: Exception | None) -> None:
        with self._cond:
            if error is not None:
                self.errors[id(seq)] = error
            self._done += 1
            self._cond.notify_all()

    def wait(self, count: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done >= count)


class Engine:
    """Serves generation for the base model and every resident adapter, mixed in one batch."""

    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        device: torch.device,
        *,
        eos_ids: frozenset[int],
        pad_id: int,
        quantized: QuantizedBase | None = None,
    ):
        self.model = model
        self.config = config
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.quantized = quantized or QuantizedBase(NONE, self.dtype, (), {})
        # Over a quantized base LoRA weights stay in float32 and deltas are computed in it (as PEFT does)
        # unless config.lora_dtype says otherwise; `adapter_version` names the base's quantization (+nf4,
        # +int8), the bare base's included.
        if config.lora_dtype != "auto":
            self.lora_dtype = DTYPES[config.lora_dtype]
        else:
            self.lora_dtype = DELTA_DTYPE if self.quantized.method != NONE else self.dtype
        self.version_tag = version_tag(self.quantized.method)
        self.modules: dict[str, ModuleInfo] = describe_modules(model)
        self.bottleneck_layout = bottleneck_layout(model)
        self.bank = AdapterBank(model, config.max_adapters, self.lora_dtype)
        store = (
            AdapterStore(config.adapter_dir, self._read_adapter)
            if config.adapter_dir is not None and not config.merged
            else None
        )
        base_entry = (
            dataclasses.replace(BASE_ENTRY, version=self.version_tag) if self.version_tag else BASE_ENTRY
        )
        self.adapters = AdapterManager(store, self.bank, config.cache_budgets(), base_entry=base_entry)
        self.context_window = context_window(model)
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        # A merged-weight variant serves one adapter folded into `model`, as the base slot.
        self.merged: MergedInfo | None = MergedInfo.load(config.base_model) if config.merged else None
        self.tenants = TenantPolicyFile(config.tenant_policy) if config.tenant_policy is not None else None
        self._seeds = np.random.default_rng()
        self._lock = threading.Lock()  # the model's one user at a time: a loop step, or a direct forward
        self._loading = 0  # sequences waiting for their adapter to load (see `enqueue`)
        self._loading_lock = threading.Lock()
        self.scheduler = Scheduler(
            model,
            self.bank,
            eos_ids=eos_ids,
            pad_id=pad_id,
            device=device,
            limits=SchedulerLimits(
                max_rows=config.max_batch_rows,
                max_kv_tokens=config.max_kv_tokens or config.max_batch_rows * self.context_window,
                prefill_chunk=config.prefill_chunk,
                queue_timeout_s=config.queue_timeout_ms / 1000,
            ),
        )
        self.loop: EngineLoop | None = None

    @classmethod
    def load(cls, config: EngineConfig, device: torch.device | str = "cpu") -> Engine:
        """Load the base model and every adapter found under `config.adapter_dir`."""
        device = torch.device(device)
        model, quantized = load_base_model(
            config.base_model,
            device,
            config.torch_dtype(device),
            config.quantization,
            config.quantization_skip,
        )
        log.info("base model %s on %s: %s", config.base_model, device, quantized.describe())
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = model.config.eos_token_id
        eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = model.config.pad_token_id
        if pad is None:
            pad = min(eos_ids) if eos_ids else 0
        engine = cls(model, config, device, eos_ids=eos_ids, pad_id=int(pad), quantized=quantized)
        store = engine.adapters.store
        if store is not None:
            wanted = config.preload_adapters
            ids = store.ids() if wanted == ("*",) else list(wanted)
            for entry in sorted(store.root.iterdir()):
                if entry.is_dir() and entry.name not in store.ids():
                    log.warning("skipping %s: its name is not a valid adapter id", entry)
            loaded = engine.adapters.preload(ids)
            log.info("preloaded %d of %d adapter(s) of the store", len(loaded), len(store.ids()))
        return engine

    @property
    def refused(self) -> dict[str, str]:
        """Adapters of the store that failed validation, with the reasons (until their files change)."""
        return self.adapters.refused

    def _read_adapter(self, adapter_id: str, directory: Path) -> Adapter:
        """One adapter from its folder, validated, on the host in the engine's dtype (the store's loader)."""
        if adapter_format(adapter_id, directory) == BOTTLENECK:
            output = self.model.get_output_embeddings()
            adapter = load_bottleneck_adapter(
                adapter_id,
                directory,
                self.bottleneck_layout,
                output_weight=None if output is None else output.weight,
                dtype=self.dtype,
                device="cpu",
                max_bytes=self.config.max_adapter_bytes,
            )
        else:
            adapter = load_lora_adapter(
                adapter_id,
                directory,
                self.modules,
                dtype=self.lora_dtype,
                device="cpu",
                max_bytes=self.config.max_adapter_bytes,
            )
        if self.version_tag:
            adapter = dataclasses.replace(adapter, version=adapter.version + self.version_tag)
        return adapter

    def acquire(self, adapter_id: str) -> BankEntry | None:
        """The entry serving `adapter_id` ('' is the base) with a reference taken (`release` it), or None
        when the adapter must be loaded first. Raises a RequestError (invalid id, not in the store, refused).

        A merged variant accepts '' and its adapter's id, both served by the merged weights in the base slot
        and answered with that adapter's id and version.
        """
        check_adapter_id(adapter_id)
        if self.merged is not None:
            self.merged.check_request(adapter_id)
            return BankEntry(self.merged.adapter_id, self.merged.adapter_version, BASE_SLOT, (), 0)
        return self.adapters.acquire(adapter_id)

    def acquire_now(self, adapter_id: str) -> BankEntry:
        """`acquire`, loading the adapter in this thread's time if needed."""
        entry = self.acquire(adapter_id)
        return entry if entry is not None else self.adapters.acquire_now(adapter_id)

    def release(self, entry: BankEntry) -> None:
        self.adapters.release(entry)

    def resolve(self, adapter_id: str) -> BankEntry:
        """The entry serving `adapter_id` now (loaded if needed), without keeping a reference."""
        entry = self.acquire_now(adapter_id)
        self.release(entry)
        return entry

    def is_canary(self, request: GenerationRequest) -> bool:
        """Whether `request` is the launcher's health canary (its tenant, on the bare base)."""
        return (
            bool(request.tenant_id)
            and request.tenant_id == self.config.canary_tenant
            and not request.adapter_id
        )

    def route(self, request: GenerationRequest) -> str:
        """The adapter id that serves `request`: its own, or with a tenant policy its tenant's default when
        it names none. Raises RequestError (invalid id; no or unknown tenant; an adapter the tenant may not
        use fails as one that does not exist)."""
        check_adapter_id(request.adapter_id)
        if self.tenants is None:
            return request.adapter_id
        if self.is_canary(request):
            return request.adapter_id  # the launcher's health canary: the bare base, nothing else
        if self.merged is not None:  # '' here means the merged adapter, which the tenant must be allowed
            return self.tenants.route(request.tenant_id, request.adapter_id or self.merged.adapter_id)
        return self.tenants.route(request.tenant_id, request.adapter_id)

    def prepare(self, request: GenerationRequest) -> tuple[RowRequest, BankEntry]:
        """Validate `request` into a row for the loop, and the entry serving it (loaded in this thread if
        needed, with a reference taken: `release` it). Raises RequestError."""
        adapter_id = self.route(request)
        row = self._row(request)
        entry = self.acquire_now(adapter_id)
        return replace(row, slot=entry.slot), entry

    def listing(self, tenant_id: str | None = None) -> dict[str, object]:
        """What the adapter cache holds, JSON-ready: every adapter of the store with its tier, kind, shape,
        version, bytes, pin and sequences using it; the budgets and their use; loads and evictions; the
        base's quantization and the layers it left unquantized. With a
        tenant policy only the adapters `tenant_id` may use are listed (RequestError for no or unknown
        tenant, as for generation)."""
        rows = self.adapters.listing()
        if self.tenants is not None:
            allowed = self.tenants.current().allowed(tenant_id)
            rows = [row for row in rows if row.adapter_id in allowed]
        return {
            "adapters": [dataclasses.asdict(row) for row in rows],
            "usage": self.adapters.usage(),
            "loads": self.adapters.loads,
            "device_loads": self.adapters.device_loads,
            "evictions": self.adapters.evictions,
            "merged": None if self.merged is None else self.merged.adapter_id,
            "base": {
                "quantization": self.quantized.method,
                "description": self.quantized.describe(),
                "unquantized_layers": dict(self.quantized.kept),
            },
        }

    def _row(self, request: GenerationRequest) -> RowRequest:
        """`request` validated into a row (its slot still the base's). Raises RequestError."""
        n_prompt = len(request.input_ids)
        if n_prompt == 0:
            raise InvalidRequest("the prompt is empty")
        if n_prompt >= self.context_window:
            raise InvalidRequest(
                f"the prompt has {n_prompt} tokens; the context window is {self.context_window} tokens"
            )
        params = SamplingParams.from_request(
            self.config.limits,
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
        )
        budget = min(params.max_tokens, self.context_window - n_prompt)
        row = RowRequest(
            input_ids=list(request.input_ids),
            slot=BASE_SLOT,
            params=params,
            max_new_tokens=budget,
            fallback_seed=int(self._seeds.integers(0, 2**63)),
        )
        if not self.scheduler.fits_alone(row):
            raise InvalidRequest(
                f"the prompt's {n_prompt} tokens plus max_tokens {budget} exceed the engine's KV budget of "
                f"{self.scheduler.limits.max_kv_tokens} tokens (max_kv_tokens)"
            )
        return row

    def start_loop(
        self,
        on_step: Callable[[StepResult, int, int], None] = lambda result, waiting, running: None,
        thread: TorchThread | None = None,
    ) -> EngineLoop:
        """Start the engine loop, on `thread` (the one that loaded the model, see `TorchThread`) or a thread
        of its own; `submit` and `generate` then go through it."""
        if self.loop is None:
            self.loop = EngineLoop(
                self.scheduler, self._lock, on_step, self.config.max_waiting_requests, thread=thread
            )
            self.loop.start()
        return self.loop

    def stop_loop(self, error: Exception | None = None) -> None:
        """Stop the loop; every request not yet answered ends with `error` (default: UNAVAILABLE)."""
        if self.loop is not None:
            self.loop.stop(error)
            self.loop = None

    def submit(
        self, request: GenerationRequest, listener_for: Callable[[BankEntry | None], SequenceListener]
    ) -> Submitted:
        """Validate `request` and queue it in the running loop, heard by `listener_for(its adapter entry)`
        (None while the adapter loads). Raises RequestError (nothing queued)."""
        item = self.sequence_for(request)
        self.enqueue(item, listener_for(item.entry))
        return item

    def sequence_for(self, request: GenerationRequest) -> Submitted:
        """Validate `request` into a sequence for the loop, not yet queued (`enqueue` it). Raises
        RequestError. A resident adapter is referenced now; a cold one is loaded by `enqueue`."""
        adapter_id = self.route(request)
        row = self._row(request)
        entry = self.acquire(adapter_id)
        if entry is not None:
            row = replace(row, slot=entry.slot)
        return Submitted(self.scheduler.sequence(row), entry, adapter_id)

    def enqueue(self, item: Submitted, listener: SequenceListener) -> None:
        """Queue a sequence from `sequence_for` in the running loop; `listener` hears from the loop thread
        (or at once, in this thread, when the loop refuses it). A sequence whose adapter is cold waits for
        its load (on the loader thread) and then joins; only it waits. Its adapter is released at its end."""
        listener = _Releasing(self.adapters, item, listener)
        if item.entry is not None:
            self._join(item, listener)
            return
        # Waiting for a load counts against the loop's bounds: at most max_waiting_requests such sequences,
        # and queue_timeout_ms from now (the loop keeps this enqueue time).
        with self._loading_lock:
            full = self._loading >= self.config.max_waiting_requests
            if not full:
                self._loading += 1
        if full:
            error = Unavailable(
                f"{self.config.max_waiting_requests} requests already wait for adapters to load; retry later"
            )
            item.seq.error, item.seq.finish_reason = error, LOOP_ERROR
            listener.on_finish(item.seq, error)
            return
        item.seq.enqueued_at = time.monotonic()
        self.adapters.acquire_later(
            item.adapter_id, lambda entry, error: self._adapter_ready(item, listener, entry, error)
        )

    def _adapter_ready(
        self, item: Submitted, listener: SequenceListener, entry: BankEntry | None, error: Exception | None
    ) -> None:
        with self._loading_lock:
            self._loading -= 1
        if error is not None:
            item.seq.error, item.seq.finish_reason = error, LOOP_ERROR
            listener.on_finish(item.seq, error)
            return
        assert entry is not None
        item.entry = entry
        item.seq.row = replace(item.seq.row, slot=entry.slot)
        self._join(item, listener)

    def _join(self, item: Submitted, listener: SequenceListener) -> None:
        loop = self.loop
        if loop is None:
            error = Unavailable("the engine loop is not running")
            item.seq.error, item.seq.finish_reason = error, LOOP_ERROR
            listener.on_finish(item.seq, error)
            return
        loop.submit(item.seq, listener)

    def cancel(self, item: Submitted) -> None:
        """End `item` with CANCELLED at the loop's next step, wherever it is (a no-op once finished)."""
        if self.loop is not None and not item.seq.finished:
            self.loop.cancel(item.seq)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult | RequestError]:
        """One outcome per request, in order. Invalid requests fail alone; the rest are batched together
        (through the running loop, with whatever else runs, or by stepping the loop's scheduler here)."""
        if self.config.batching == "request":
            return self._generate_to_the_end(requests)
        outcomes: list[GenerationResult | RequestError | None] = [None] * len(requests)
        waiter = _Collector()
        submitted: list[tuple[int, Submitted]] = []
        for i, request in enumerate(requests):
            try:
                if self.loop is not None:
                    submitted.append((i, self.submit(request, lambda entry: waiter)))
                else:
                    row, entry = self.prepare(request)
                    submitted.append((i, Submitted(self.scheduler.sequence(row), entry)))
            except RequestError as exc:
                outcomes[i] = exc
        if self.loop is None:
            try:
                with self._lock:
                    for _, item in submitted:
                        self.scheduler.add(item.seq)
                    try:
                        while not all(item.seq.finished for _, item in submitted):
                            self.scheduler.step()
                    except BaseException:
                        self.scheduler.drain()
                        raise
            finally:
                for _, item in submitted:
                    self.release(item.entry)
        else:
            waiter.wait(len(submitted))
        for i, item in submitted:
            # Stepped here, a sequence's error (a queue timeout) is on the sequence; through the loop, the
            # listener got it. Either way it is the request's answer, never an empty result.
            error = waiter.errors.get(id(item.seq)) or item.seq.error
            outcomes[i] = error if error is not None else item.result()
        return outcomes  # type: ignore[return-value]

    def _generate_to_the_end(
        self, requests: Sequence[GenerationRequest]
    ) -> list[GenerationResult | RequestError]:
        """Request-level batching: one batch of these requests, generated until its last row ends."""
        outcomes: list[GenerationResult | RequestError | None] = [None] * len(requests)
        rows: list[RowRequest] = []
        entries: list[BankEntry] = []
        positions: list[int] = []
        for i, request in enumerate(requests):
            try:
                row, entry = self.prepare(request)
            except RequestError as exc:
                outcomes[i] = exc
                continue
            rows.append(row)
            entries.append(entry)
            positions.append(i)
        if rows:
            try:
                with self._lock, torch.inference_mode(), self.bank.routing([r.slot for r in rows]) as routing:
                    generated = generate_rows(
                        self.model,
                        routing,
                        rows,
                        eos_ids=self.eos_ids,
                        pad_id=self.pad_id,
                        device=self.device,
                    )
            finally:
                for entry in entries:
                    self.release(entry)
            for i, entry, out in zip(positions, entries, generated, strict=True):
                outcomes[i] = GenerationResult(
                    out.token_ids, entry.adapter_id, entry.version, out.finish_reason
                )
        return outcomes  # type: ignore[return-value]

    def logits(
        self, prompts: Sequence[Sequence[int]], adapter_ids: Sequence[str]
    ) -> tuple[torch.Tensor, Batch]:
        """Logits of a left-padded mixed batch in one forward: ([B, T, V], the padded batch)."""
        entries: list[BankEntry] = []
        try:
            entries.extend(self.acquire_now(a) for a in adapter_ids)
            batch = left_pad(prompts, self.pad_id, self.device)
            with self._lock, torch.inference_mode(), self.bank.routing([e.slot for e in entries]):
                return forward_logits(self.model, batch), batch
        finally:
            for entry in entries:
                self.release(entry)


def load_engine(config: EngineConfig, device: torch.device | str = "cpu") -> Engine:
    """`Engine.load`, with `config.num_threads` torch threads first (0 leaves torch's default); call it on
    the thread that will run the engine (`TorchThread`)."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    return Engine.load(config, device)
