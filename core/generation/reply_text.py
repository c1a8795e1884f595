"""Reply text: from what the model said to what a user sees (final, or partial while streaming).

Cleaning: control tokens' text and control characters out, leading `AI:` prefixes dropped, cut
at the first stop marker (a stop string or a stray `AI:`), Korean jamo the tokenizer decomposed
repaired, whitespace collapsed to single spaces.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from core.generation.base import Candidate, FinishReason, ReplyTokenizer
from core.text import remove_control_characters

__all__ = [
    "AI_PREFIX",
    "candidate_from_ids",
    "clean_reply",
    "compat_jamo",
    "continuation_text",
    "find_stop",
    "partial_reply",
    "split_reply",
    "stop_markers",
    "strip_leading_ai",
]

AI_PREFIX = "AI:"
_SPECIAL_TEXT = re.compile(r"</?(?:s|usr|sys|pad|unk|mask|d|unused\d+)>|<\|endoftext\|>")
_LEADING_AI = re.compile(r"^\s*(?:AI\s*:\s*)+")
_CHOSEONG_TO_COMPAT = dict(
    zip(map(chr, range(0x1100, 0x1113)), "ㄱㄲㄴㄷㄸㄹㅁㅂㅃㅅㅆㅇㅈㅉㅊㅋㅌㅍㅎ", strict=True)
)
_LONE_CHOSEONG = re.compile(r"[\u1100-\u1112](?![\u1161-\u1175])")
_LONE_JUNGSEONG = re.compile(r"(?<![\u1100-\u1112])[\u1161-\u1175]")
_CONTINUATION_CONTEXT = 4


def stop_markers(stop_strings: Sequence[str]) -> tuple[str, ...]:
    """The strings that end a reply: the request's stop strings plus a stray `AI:`."""
    return tuple(dict.fromkeys(s for s in (*stop_strings, AI_PREFIX) if s))


def strip_leading_ai(text: str) -> str:
    """Drop leading whitespace and any `AI:` prefixes the model repeated from the prompt."""
    return _LEADING_AI.sub("", text)


def find_stop(text: str, markers: Sequence[str]) -> int:
    """Index of the first marker in `text`, or -1."""
    found = [i for i in (text.find(m) for m in markers) if i >= 0]
    return min(found, default=-1)


def compat_jamo(text: str) -> str:
    """Lone conjoining jamo (KoGPT2's NFKC turns ㅋ into ᄏ) back to the letters people type."""
    text = _LONE_CHOSEONG.sub(lambda m: _CHOSEONG_TO_COMPAT[m.group()], text)
    return _LONE_JUNGSEONG.sub(lambda m: chr(ord(m.group()) - 0x1161 + 0x314F), text)


def split_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> tuple[str, bool]:
    """The cleaned reply, and whether a stop marker cut it (see `clean_reply`)."""
    flat = remove_control_characters(_SPECIAL_TEXT.sub(" ", text), breaks_to_spaces=True)
    body = strip_leading_ai(flat)
    cut = find_stop(body, stop_markers(stop_strings))
    if cut >= 0:
        body = body[:cut]
    return " ".join(compat_jamo(body).split()), cut >= 0


def clean_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> str:
    """Reply text fit to send: no special tokens or controls, no leading `AI:`, cut at the first
    stop string or stray `AI:`, whitespace collapsed to single spaces."""
    return split_reply(text, stop_strings)[0]


def partial_reply(text: str, stop_strings: Sequence[str] = ("User:",)) -> str:
    """A reply still being generated, cleaned like `clean_reply`, minus a trailing piece that
    may be the start of a stop marker (`Us` of `User:`), so a stream never shows it."""
    cleaned, stopped = split_reply(text, stop_strings)
    if stopped:
        return cleaned
    for marker in stop_markers(stop_strings):
        for n in range(min(len(marker), len(cleaned)), 0, -1):
            if cleaned.endswith(marker[:n]):
                return cleaned[:-n].rstrip()
    return cleaned


def continuation_text(
    tokenizer: ReplyTokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int], text: str
) -> str:
    """For a reply that continues the prompt's text: `text` with a leading space when the model
    began a new word (decoding the new ids alone would drop that space)."""
    if not text:
        return text
    tail = list(prompt_ids[-_CONTINUATION_CONTEXT:])
    before = tokenizer.decode(tail)
    after = tokenizer.decode(tail + list(new_ids[:_CONTINUATION_CONTEXT]))
    starts_word = after.startswith(before) and after[len(before) : len(before) + 1].isspace()
    return f" {text}" if starts_word else text


def candidate_from_ids(
    tokenizer: ReplyTokenizer, new_ids: Sequence[int], ended: FinishReason
) -> Candidate:
    """A decoder's candidate from its new ids; ids ending with the EOS ended at EOS (the EOS
    counts as a new token but is not part of the text)."""
    ids = list(new_ids)
    eos = tokenizer.eos_id
    body = tuple(ids[: ids.index(eos)] if eos in ids else ids)
    reason = FinishReason.EOS if eos in ids else ended
    return Candidate(tokenizer.decode(body), len(ids), reason, body)
