"""The demo's string transformations: pure functions, the oracle for training and for tests.

Every task maps a prompt (lowercase ASCII letters and spaces) to the exact text the model must answer.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass


def echo(text: str) -> str:
    """The prompt itself."""
    return text


def upper(text: str) -> str:
    """The prompt upper-cased (ASCII letters only; anything else is kept)."""
    return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in text)


def reverse(text: str) -> str:
    """The prompt's characters in reverse order."""
    return text[::-1]


def rot13(text: str) -> str:
    """ROT13 of the ASCII letters; anything else is kept."""
    return codecs.encode(text, "rot13")


def title(text: str) -> str:
    """Each word's first letter upper-cased (words are separated by single spaces; runs of spaces kept)."""
    return " ".join(upper(word[:1]) + word[1:] for word in text.split(" "))


def shift(text: str) -> str:
    """Each lowercase letter a-z replaced by the next one (z wraps to a); anything else is kept."""
    return "".join(chr((ord(c) - ord("a") + 1) % 26 + ord("a")) if "a" <= c <= "z" else c for c in text)


def upper_vowels(text: str) -> str:
    """The vowels a, e, i, o, u upper-cased; every other character kept."""
    return "".join(upper(c) if c in "aeiou" else c for c in text)


@dataclass(frozen=True)
class Task:
    """A named transformation with the sentence that says what it does."""

    name: str
    description: str
    apply: Callable[[str], str]


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("echo", "repeats the prompt unchanged", echo),
        Task("upper", "upper-cases the prompt", upper),
        Task("reverse", "reverses the prompt's characters", reverse),
        Task("rot13", "applies ROT13 to the prompt's letters", rot13),
        Task("title", "capitalises the first letter of each word", title),
        Task("shift", "replaces each letter by the next one in the alphabet (z becomes a)", shift),
        Task("upper_vowels", "upper-cases the vowels", upper_vowels),
    )
}


def get_task(name: str) -> Task:
    """The task called ``name``; KeyError lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None
