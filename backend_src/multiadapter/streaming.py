"""Text as it is generated: deltas that are valid text and that join to exactly the final answer.

The final answer is `decode(all generated ids)` (tokenization.py). A delta is what that decode of the ids so
far adds to the text already sent, minus a tail that may still change:

- trailing U+FFFD: a byte-level tokenizer splits a character over several tokens, and the decode of an
  incomplete UTF-8 sequence ends in replacement characters until its last byte arrives;
- trailing whitespace, when the tokenizer cleans up tokenization spaces (`" ."` becomes `"."` once the dot
  arrives), so a space is sent with whatever follows it.

What is held back is sent with the next delta or the last one, so the deltas always join to the answer. Each
update decodes every id so far (one Rust call, O(n) for n ids, at most `max_tokens_cap`), which keeps every
tokenizer's decoding rules (special tokens skipped, SentencePiece's leading space, byte fallback) exact.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"


class TextStream:
    """The text deltas of one generated sequence. Not thread-safe: one thread feeds it.

    `decode(ids) -> str` is the codec's decode; `hold_spaces` holds trailing whitespace back (tokenizers
    that clean up tokenization spaces).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], *, hold_spaces: bool = False) -> None:
        self._decode = decode
        self._hold_spaces = hold_spaces
        self._ids: list[int] = []
        self.sent = ""  # the text already handed out, a prefix of every later decode

    def push(self, ids: Sequence[int]) -> str:
        """Add newly generated `ids`; the text that is now certain and not yet sent ("" if none)."""
        self._ids.extend(ids)
        text = self._decode(self._ids)
        stable = text.rstrip(REPLACEMENT)
        if self._hold_spaces:
            stable = stable.rstrip()
        return self._advance(stable)

    def finish(self, ids: Sequence[int] = ()) -> str:
        """Add the last `ids`; everything not yet sent. After this, `sent` is the final answer."""
        self._ids.extend(ids)
        return self._advance(self._decode(self._ids), final=True)

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    def _advance(self, text: str, *, final: bool = False) -> str:
        if not text.startswith(self.sent):
            # The decoder rewrote text already sent (a rule the hold-back above does not cover): what was
            # sent cannot be taken back, so the stream's join would differ from the answer. Say so loudly.
            log.error(
                "streamed text diverged from the decode of the ids: sent %r, decode now %r", self.sent, text
            )
            return ""
        delta = text[len(self.sent) :]
        self.sent = text
        return delta


def cleans_up_spaces(tokenizer: object) -> bool:
    """Whether `tokenizer.decode` rewrites spaces before punctuation (transformers' clean-up option)."""
    return bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
