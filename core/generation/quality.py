"""Judging a cleaned reply: empty (nothing to say) or degenerate (a repetition loop)."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from core.generation.base import TokenCounter

__all__ = ["is_acceptable", "is_degenerate", "is_empty_reply", "longest_loop"]

LOOP_MIN_REPEATS = 3
LOOP_MIN_SPAN = 12
LOOP_MAX_NGRAM = 8
DISTINCT_MIN_TOKENS = 16
DISTINCT_MIN_RATIO = 0.3


def longest_loop(ids: Sequence[int], n: int) -> tuple[int, int]:
    """(repeats, span in tokens) of the longest back-to-back repetition of an `n`-gram."""
    best = run = 0
    for i in range(len(ids) - n):
        run = run + 1 if ids[i] == ids[i + n] else 0
        best = max(best, run)
    return best // n + 1, best + n


def is_degenerate(ids: Sequence[int]) -> bool:
    """A repetition loop: some n-gram (n ≤ 8) repeated back to back ≥ 3 times over ≥ 12 tokens
    (so 'ㅋㅋㅋㅋ' passes but a sentence said three times does not), or ≥ 16 tokens of which
    fewer than 30% are distinct."""
    for n in range(1, LOOP_MAX_NGRAM + 1):
        repeats, span = longest_loop(ids, n)
        if repeats >= LOOP_MIN_REPEATS and span >= LOOP_MIN_SPAN:
            return True
    return len(ids) >= DISTINCT_MIN_TOKENS and len(set(ids)) < DISTINCT_MIN_RATIO * len(ids)


def is_empty_reply(text: str) -> bool:
    """No letter, digit or symbol (emoji count): empty, whitespace or punctuation only."""
    return not any(ch.isalnum() or unicodedata.category(ch).startswith("S") for ch in text)


def is_acceptable(text: str, tokenizer: TokenCounter) -> bool:
    """A cleaned reply worth sending: neither empty nor a loop (judged on its tokens)."""
    return not is_empty_reply(text) and not is_degenerate(tokenizer.encode_text(text))
