"""Text <-> token ids exactly as the request contract states.

Encoding is `tokenizer(text)` with the base model directory's own tokenizer (its special tokens and
template included); decoding is `tokenizer.decode(new_ids, skip_special_tokens=True)`. Anyone can
reproduce an answer offline with transformers and PEFT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import AutoTokenizer

from .errors import ConfigError, InvalidRequest

DEFAULT_MAX_TEXT_BYTES = 256 * 1024


class TextCodec:
    """The base model's tokenizer behind the two operations the server needs."""

    def __init__(self, tokenizer, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES):
        self.tokenizer = tokenizer
        self.max_text_bytes = max_text_bytes

    @classmethod
    def load(cls, base_model: Path, max_text_bytes: int = DEFAULT_MAX_TEXT_BYTES) -> TextCodec:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ConfigError("tokenizer", [f"cannot load the tokenizer of {base_model}: {exc}"]) from exc
        return cls(tokenizer, max_text_bytes)

    def encode(self, raw: bytes) -> list[int]:
        """Token ids of UTF-8 `raw`. Raises InvalidRequest for empty, oversized or non-UTF-8 text."""
        if len(raw) > self.max_text_bytes:
            raise InvalidRequest(f"text_input is {len(raw)} bytes; the limit is {self.max_text_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"text_input is not valid UTF-8 (byte {exc.start})") from exc
        if not text:
            raise InvalidRequest("text_input is empty")
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
