"""When a decoder stops: plain Python, the same rule for every decoder.

A reply ends at a stop string (the next `User:` turn) or a stray `AI:` in its new text (a
leading `AI:` the model repeated from the prompt excepted), or when the request's deadline
passes or it is cancelled. EOS and `max_new_tokens` are the decoders' own business.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

from core.generation.base import Attempt, Candidate, Control, FinishReason, ReplyTokenizer
from core.generation.errors import timeout_error
from core.generation.reply_text import (
    candidate_from_ids,
    find_stop,
    stop_markers,
    strip_leading_ai,
)

__all__ = ["RunControl", "StopReason", "StopRule", "stop_rules", "stopped_candidates"]

StopReason = Literal["stop", "timeout"]


class RunControl:
    """The deadline and cancel flag of one request (the `Control` of its attempts), shared by
    the event loop and whichever thread decodes (the engine's, a worker's)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.deadline = time.monotonic() + timeout_s
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    def expired(self) -> bool:
        return self._cancelled.is_set() or time.monotonic() >= self.deadline

    def check(self) -> None:
        """Raise GenerationError(TIMEOUT) once the deadline passed or the request was cancelled."""
        if self.expired():
            raise timeout_error(self.timeout_s)


class StopRule:
    """Called with a candidate's new ids after each token: True once it should stop, with the
    `reason`. Each call decodes only a short tail of the ids (all of them during the first
    `HEAD_TOKENS`, where a leading `AI:` is not a stop), so a long reply costs no more per token.
    `on_ids` (streaming) hears every call's ids."""

    HEAD_TOKENS = 16

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop_strings: Sequence[str],
        control: Control,
        on_ids: Callable[[list[int]], None] | None = None,
    ) -> None:
        self._decode = decode
        self._markers = stop_markers(stop_strings)
        self._overlap = max(map(len, self._markers)) + 8
        self._control = control
        self._on_ids = on_ids
        self._checked = 0
        self.reason: StopReason | None = None

    def __call__(self, new_ids: Sequence[int]) -> bool:
        if self._on_ids is not None:
            self._on_ids(list(new_ids))
        if self._control.expired():
            self.reason = "timeout"
        elif self._has_stop(new_ids):
            self.reason = "stop"
        return self.reason is not None

    def _has_stop(self, new_ids: Sequence[int]) -> bool:
        start = self._checked - self._overlap
        start = start if start >= self.HEAD_TOKENS else 0
        self._checked = len(new_ids)
        text = self._decode(new_ids[start:])
        return find_stop(strip_leading_ai(text) if start == 0 else text, self._markers) >= 0


def stop_rules(
    decode: Callable[[Sequence[int]], str], attempt: Attempt, rows: int
) -> list[StopRule]:
    """A rule for each candidate row of `attempt`; the first row's also hears `on_ids`."""
    return [
        StopRule(
            decode, attempt.stop_strings, attempt.control, attempt.on_ids if row == 0 else None
        )
        for row in range(rows)
    ]


def stopped_candidates(
    tokenizer: ReplyTokenizer,
    rows: Sequence[Sequence[int]],
    rules: Sequence[StopRule],
    control: Control,
) -> list[Candidate]:
    """The candidates of rows decoded under `rules` (one each); GenerationError(TIMEOUT) when a
    rule stopped its row at the deadline. A row ends at EOS or else counts as LENGTH (the policy
    finds the stop strings in the text)."""
    if any(rule.reason == "timeout" for rule in rules):
        raise timeout_error(control.timeout_s)
    return [candidate_from_ids(tokenizer, ids, FinishReason.LENGTH) for ids in rows]
