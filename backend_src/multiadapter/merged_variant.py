"""What a merged-weight model directory serves: the adapter folded into it, recorded beside its weights.

A merged variant is a full Hugging Face model directory whose weights are W' = W + s·B·A for one LoRA
adapter. `merged_adapter.json` in that directory names the adapter and its content version, so the model
serving it answers with the same `adapter_id` / `adapter_version` as the bank serving the unmerged adapter,
and accepts only that id (or the empty one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .adapter_ids import check_adapter_id
from .errors import ConfigError, InvalidRequest

MERGED_INFO_FILE = "merged_adapter.json"
FORMAT = 1


@dataclass(frozen=True)
class MergedInfo:
    """The adapter a merged directory serves, its version, the base it was merged into, and the dtype."""

    adapter_id: str
    adapter_version: str
    base_model: str
    dtype: str

    def save(self, directory: Path) -> None:
        payload = {"format": FORMAT, **asdict(self)}
        (directory / MERGED_INFO_FILE).write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> MergedInfo:
        """Read and validate `directory`/merged_adapter.json; ConfigError naming every problem."""
        path = directory / MERGED_INFO_FILE
        what = f"merged model {directory}"
        if not path.is_file():
            raise ConfigError(what, [f"no {MERGED_INFO_FILE}: not a merged-weight model directory"])
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(what, [f"{MERGED_INFO_FILE} is not readable JSON: {exc}"]) from None
        problems = []
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise ConfigError(what, [f"{MERGED_INFO_FILE} is not format {FORMAT}"])
        fields = {}
        for name in ("adapter_id", "adapter_version", "base_model", "dtype"):
            value = payload.get(name)
            if not isinstance(value, str):
                problems.append(f"{MERGED_INFO_FILE}: {name} must be a string")
            fields[name] = value
        if not problems:
            try:
                check_adapter_id(fields["adapter_id"])
            except InvalidRequest as exc:
                problems.append(f"{MERGED_INFO_FILE}: {exc}")
            if not fields["adapter_id"]:
                problems.append(f"{MERGED_INFO_FILE}: adapter_id is empty")
        if problems:
            raise ConfigError(what, problems)
        return cls(**fields)

    def check_request(self, adapter_id: str) -> None:
        """A request to this model may name its adapter or none; anything else is InvalidRequest."""
        if adapter_id not in ("", self.adapter_id):
            raise InvalidRequest(
                f"this model serves adapter {self.adapter_id!r} merged into the base: adapter_id must be "
                f"empty or {self.adapter_id!r}, got {adapter_id!r}"
            )
