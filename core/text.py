"""Pure text helpers: cleaning user input and splitting long replies for a platform's limit."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\u0085\u2028\u2029]+")
_SPACES = re.compile(r"[ \u00a0\u3000]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？~])\s+|(?<=[다요죠까네군])[.!?]*\s+")
_KEEP_CONTROLS = {"\n", "\t"}


def remove_control_characters(text: str) -> str:
    """Drop C0/C1 controls (NUL included) and lone surrogates; keep newlines, tabs and ZWJ."""
    return "".join(
        ch for ch in text if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in {"Cc", "Cs"}
    )


def to_single_line(text: str) -> str:
    """Flatten text to one line so nothing inside it can start a new `User:`/`AI:` turn."""
    flat = remove_control_characters(_LINE_BREAKS.sub(" ", text))
    return _SPACES.sub(" ", flat).strip()


def utf16_length(text: str) -> int:
    """Length as Telegram counts it (UTF-16 code units)."""
    return len(text.encode("utf-16-le")) // 2


def split_message(text: str, limit: int, length: Callable[[str], int] = len) -> list[str]:
    """Split `text` into chunks of at most `limit` (as measured by `length`).

    Prefers paragraph, then line, then sentence (Korean endings included), then word boundaries;
    only as a last resort cuts between two characters (never inside one).
    """
    if limit < 1:
        raise ValueError("limit must be positive")
    chunks: list[str] = []
    rest = text.strip()
    while rest:
        if length(rest) <= limit:
            chunks.append(rest)
            break
        cut = _best_cut(rest, limit, length)
        chunks.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    return [chunk for chunk in chunks if chunk]


def _longest_prefix(text: str, limit: int, length: Callable[[str], int]) -> int:
    """How many characters of `text` fit in `limit` (binary search; `length` is monotone)."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if length(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    return max(low, 1)


def _best_cut(text: str, limit: int, length: Callable[[str], int]) -> int:
    fits = _longest_prefix(text, limit, length)
    window = text[:fits]
    floor = fits // 3
    for pattern in (r"\n\s*\n", r"\n", _SENTENCE_END.pattern, r"\s"):
        ends = [m.end() for m in re.finditer(pattern, window) if m.end() > floor]
        if ends:
            return ends[-1]
    return fits
