"""Per-adapter request accounting, ready for a metrics endpoint (no Triton here: triton_boundary exports it).

Each answered request becomes one `RequestRecord` (its adapter, outcome, token counts, latency, time to first
token). `AdapterTally` collects them from any thread and hands them over in batches (`drain`), so exporting
(a round trip to the Triton process per update) never runs on the engine loop's or a request's thread.

Label values stay bounded (`AdapterLabels`): the bare base is "", an adapter that was served gets its own id
until `max_series` ids have one, and everything else is counted under "other": ids past the bound, and
refused requests for ids that were never served (unknown ids, ids a tenant may not see), so a client cannot
mint series by sending made-up names.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

OTHER = "other"
BASE_LABEL = ""
OK = "ok"
DEFAULT_MAX_SERIES = 64


@dataclass(frozen=True)
class RequestRecord:
    """One answered request. outcome: OK or an error code's name. ttft_s: None when no token came."""

    adapter: str
    outcome: str
    prompt_tokens: int
    generated_tokens: int
    duration_s: float
    ttft_s: float | None


class AdapterLabels:
    """The label value of each adapter id, at most `max_series` ids (besides the base and OTHER)."""

    def __init__(self, max_series: int = DEFAULT_MAX_SERIES):
        if max_series < 0:
            raise ValueError(f"max_series must be >= 0, got {max_series}")
        self.max_series = max_series
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def served(self, adapter_id: str) -> str:
        """The label of a request that `adapter_id` served (it exists: it may get a series of its own)."""
        if adapter_id == BASE_LABEL:
            return BASE_LABEL
        with self._lock:
            if adapter_id in self._ids:
                return adapter_id
            if len(self._ids) < self.max_series:
                self._ids.add(adapter_id)
                return adapter_id
        return OTHER

    def refused(self, adapter_id: str | None) -> str:
        """The label of a request refused before an adapter served it: its id's series if it has one."""
        if adapter_id == BASE_LABEL:
            return BASE_LABEL
        with self._lock:
            return adapter_id if adapter_id in self._ids else OTHER


class AdapterTally:
    """Request records from any thread, drained in order by one exporter."""

    def __init__(self) -> None:
        self._records: list[RequestRecord] = []
        self._lock = threading.Lock()

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def drain(self) -> list[RequestRecord]:
        with self._lock:
            records, self._records = self._records, []
        return records
