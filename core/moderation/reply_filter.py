"""The reply filter (`KOBOT_REPLY_FILTER=off|mask|block`): profanity and slurs in generated text.

Matching works on a *skeleton* of the text: its letters only (Hangul, jamo, Latin, lowercased;
NFKC for the rest), each mapped back to its place in the text. So 씨 발, 시1발, 씨.발 and
s.h.i.t are found like 씨발, 시발 and shit. A match that the skeleton made by dropping spaces,
digits or symbols counts only when it starts a word (다시 발견 is not 시발); English words are
whole words plus a common suffix (Dickens is not dick). The word lists are `core.moderation.words`;
an admin file (`KOBOT_REPLY_FILTER_WORDS`) adds words, one a line, and `!word` lines add
allowed words.

`ReplyGuard.generate` is the one place generated text passes through (chat, /complete, /story,
/retry): `mask` replaces each matched letter with ○, streamed partials included; `block`
generates once more, then answers `REPLY_BLOCKED`.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from core.dialogue.streaming import generate
from core.generation.base import GenerationBackend, GenerationRequest, GenerationResult
from core.moderation import words as reply_words
from core.settings import Settings

MASK_CHAR = "○"
REPLY_BLOCKED = (
    "죄송해요, 그 답은 보여 드리기 어려워요. 다른 이야기를 해 볼까요? "
    "(Sorry, I can't show that reply. Shall we talk about something else?)"
)
_FIRST_SYLLABLE, _LAST_SYLLABLE = 0xAC00, 0xD7A3
_INITIALS = "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ"
_CLUSTERS = {"ㅄ": "ㅂㅅ"}  # one jamo written for two
_LEET = str.maketrans({"1": "i", "!": "i", "3": "e", "4": "a", "@": "a", "0": "o", "$": "s"})


class FilterMode(StrEnum):
    OFF = "off"
    MASK = "mask"
    BLOCK = "block"


Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Skeleton:
    """The kept letters of a text and, for each, its index in the text."""

    letters: str
    places: tuple[int, ...]

    def span(self, start: int, end: int) -> Span:
        return self.places[start], self.places[end - 1] + 1

    def joined(self, start: int, end: int) -> bool:
        """Whether letters `start:end` came from text with other characters between them."""
        first, last = self.span(start, end)
        return last - first > len(set(self.places[start:end]))


def is_syllable(char: str) -> bool:
    return _FIRST_SYLLABLE <= ord(char) <= _LAST_SYLLABLE


def initial_of(syllable: str) -> str:
    """The initial consonant of a Hangul syllable, as a compatibility jamo (시 → ㅅ)."""
    return _INITIALS[(ord(syllable) - _FIRST_SYLLABLE) // 588]


def _letters_of(char: str, keep_digits: bool) -> str:
    if is_syllable(char) or "\u3131" <= char <= "\u318e":
        return _CLUSTERS.get(char, char)
    folded = unicodedata.normalize("NFKC", char).lower()
    return "".join(c for c in folded if c.isalpha() or (keep_digits and c.isdigit()))


def skeleton(text: str, keep_digits: bool = False) -> Skeleton:
    """The letters of `text` (and its digits when `keep_digits`), each with its index."""
    letters: list[str] = []
    places: list[int] = []
    for index, char in enumerate(text):
        kept = _letters_of(char, keep_digits)
        letters.append(kept)
        places.extend([index] * len(kept))
    return Skeleton("".join(letters), tuple(places))


def word_pattern(word: str) -> str:
    """A regex for `word` in a skeleton; syllables may be written as their initial consonant
    when the word has two or more of them."""
    syllables = sum(is_syllable(c) for c in word)
    parts = []
    for char in word.lower():
        if is_syllable(char) and syllables >= 2:
            parts.append(f"(?:{char}|{initial_of(char)})")
        else:
            parts.append(re.escape(char))
    return "".join(parts)


def _compile(words: Iterable[str], literal: bool = False) -> re.Pattern[str] | None:
    unique = sorted({w.lower() for w in words if w}, key=len, reverse=True)
    if not unique:
        return None
    parts = [re.escape(w) if literal else word_pattern(w) for w in unique]
    return re.compile("|".join(parts))


def _is_latin(text: str) -> bool:
    return text.isascii() and text.isalpha()


class ProfanityFilter:
    """Finds blocked words in a text (see the module doc); stateless once built."""

    def __init__(self, blocked: Iterable[str], allowed: Iterable[str] = ()) -> None:
        self._pattern = _compile(blocked)
        self._allowed = _compile(allowed, literal=True)

    def spans(self, text: str) -> list[Span]:
        """Where blocked words are, as (start, end) indices into `text`."""
        found: set[Span] = set()
        allowed = self._allowed_spans(text)
        for shape in (skeleton(text), skeleton(text, keep_digits=True), _leet_skeleton(text)):
            found.update(self._matches(text, shape, allowed))
        return sorted(found)

    def is_offensive(self, text: str) -> bool:
        return bool(self.spans(text))

    def mask(self, text: str) -> str:
        """`text` with every non-space character of each match replaced by `MASK_CHAR`."""
        chars = list(text)
        for start, end in self.spans(text):
            for index in range(start, end):
                if not chars[index].isspace():
                    chars[index] = MASK_CHAR
        return "".join(chars)

    def _matches(self, text: str, shape: Skeleton, allowed: list[Span]) -> Iterable[Span]:
        if self._pattern is None:
            return
        for found in self._pattern.finditer(shape.letters):
            span = shape.span(found.start(), found.end())
            joined = shape.joined(found.start(), found.end())
            accepted = _accept(text, span, found.group(), joined)
            if accepted is not None and not _inside(accepted, allowed):
                yield accepted

    def _allowed_spans(self, text: str) -> list[Span]:
        if self._allowed is None:
            return []
        shape = skeleton(text, keep_digits=True)
        return [shape.span(m.start(), m.end()) for m in self._allowed.finditer(shape.letters)]


def _leet_skeleton(text: str) -> Skeleton:
    """Digits and symbols read as the Latin letters they stand for (sh1t, $hit), for English."""
    return skeleton(text.translate(_LEET))


def _inside(span: Span, allowed: Sequence[Span]) -> bool:
    return any(start <= span[0] and span[1] <= end for start, end in allowed)


def _accept(text: str, span: Span, matched: str, joined: bool) -> Span | None:
    """The span of a real match, or None: English as a whole word (its suffix included); a
    match that spans dropped characters, or that begins with a digit, only at a word start."""
    start, end = span
    if _is_latin(matched):
        return _latin_word(text, start, end)
    if (joined or matched[0].isdigit()) and start > 0 and text[start - 1].isalnum():
        return None
    return span


def _latin_word(text: str, start: int, end: int) -> Span | None:
    """`start:end` with the letters after it, when it starts a word and those letters are one
    of `ENGLISH_SUFFIXES`."""
    if start > 0 and _is_latin(text[start - 1]):
        return None
    rest = end
    while rest < len(text) and _is_latin(text[rest]):
        rest += 1
    return (start, rest) if text[end:rest].lower() in reply_words.ENGLISH_SUFFIXES else None


def read_word_file(path: str | Path) -> tuple[list[str], list[str]]:
    """An admin's word file: one word a line, `#` comments, `!word` for an allowed word."""
    blocked: list[str] = []
    allowed: list[str] = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line.startswith("!"):
            allowed.append(line[1:].strip())
        elif line:
            blocked.append(line)
    return blocked, allowed


def build_filter(words_file: str | Path | None = None) -> ProfanityFilter:
    """The built-in lists, extended by an admin's file when given."""
    blocked, allowed = list(reply_words.BLOCKED), list(reply_words.ALLOWED)
    if words_file is not None:
        more_blocked, more_allowed = read_word_file(words_file)
        blocked += more_blocked
        allowed += more_allowed
    return ProfanityFilter(blocked, allowed)


class ReplyGuard:
    """Generation with the reply filter applied (see the module doc)."""

    def __init__(self, mode: FilterMode, words: ProfanityFilter | None = None) -> None:
        self.mode = mode
        self.words = words if words is not None else build_filter()

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplyGuard:
        """`KOBOT_REPLY_FILTER` and `KOBOT_REPLY_FILTER_WORDS`; no lists built when off."""
        mode = FilterMode(settings.reply_filter)
        if mode is FilterMode.OFF:
            return cls(mode, ProfanityFilter(()))
        return cls(mode, build_filter(settings.reply_filter_words))

    async def generate(
        self,
        backend: GenerationBackend,
        request: GenerationRequest,
        shown: Callable[[str], str] = lambda text: text,
    ) -> GenerationResult:
        """`core.streaming.generate`, its partials and its result filtered by the mode."""
        if self.mode is FilterMode.OFF:
            return await generate(backend, request, shown)
        result = await generate(backend, request, lambda text: shown(self.words.mask(text)))
        if self.mode is FilterMode.MASK:
            return self.masked(result)
        return await self._blocked(backend, request, shown, result)

    def masked(self, result: GenerationResult) -> GenerationResult:
        alternatives = tuple(self.words.mask(text) for text in result.alternatives)
        return dataclasses.replace(
            result, text=self.words.mask(result.text), alternatives=alternatives
        )

    async def _blocked(
        self,
        backend: GenerationBackend,
        request: GenerationRequest,
        shown: Callable[[str], str],
        result: GenerationResult,
    ) -> GenerationResult:
        """A clean reply: the first clean candidate, else one more generation, else the
        polite line."""
        clean = self.clean_candidates(result)
        if not clean:
            retried = await generate(backend, request, lambda text: shown(self.words.mask(text)))
            clean = self.clean_candidates(retried)
            result = retried
        text, *others = clean or [REPLY_BLOCKED]
        return dataclasses.replace(result, text=text, alternatives=tuple(others))

    def clean_candidates(self, result: GenerationResult) -> list[str]:
        candidates = (result.text, *result.alternatives)
        return [text for text in candidates if not self.words.is_offensive(text)]
