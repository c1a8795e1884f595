"""Pure text helpers: cleaning user input and splitting long replies for a platform's limit."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable

_LINE_BREAKS = re.compile(r"[\r\n\t\v\f\u0085\u2028\u2029]+")
_SPACES = re.compile(r"[ \u00a0\u3000]{2,}")
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？~])\s+|(?<=[다요죠까네군])[.!?]*\s+")
_KEEP_CONTROLS = {"\n", "\t"}
_INVISIBLE = frozenset(
    {
        "\u200e",
        "\u200f",
        "\ufeff",
        *map(chr, range(0x202A, 0x202F)),
        *map(chr, range(0x2066, 0x206A)),
    }
)
"""Direction marks, bidi overrides and isolates, the BOM: invisible, and able to reorder text."""


def remove_control_characters(text: str, *, breaks_to_spaces: bool = False) -> str:
    """Drop C0/C1 controls (NUL included), lone surrogates and bidi marks/overrides; joiners
    (ZWJ) and variation selectors stay, so emoji sequences survive. Newlines and tabs stay, or
    with `breaks_to_spaces` every whitespace character (line breaks included) becomes a space."""
    if breaks_to_spaces:
        return "".join(" " if ch.isspace() else ch for ch in text if _kept(ch, ch.isspace()))
    return "".join(ch for ch in text if _kept(ch, ch in _KEEP_CONTROLS))


def _kept(ch: str, keep_if_control: bool) -> bool:
    category = unicodedata.category(ch)
    if category == "Cc":
        return keep_if_control
    return category != "Cs" and ch not in _INVISIBLE


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
