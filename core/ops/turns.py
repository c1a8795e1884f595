"""Per-turn metrics and one log event per turn.

`TurnObserver` is held by the DialogueManager (one per process, no globals): it counts messages
and replies per platform, times each turn, records generation figures and errors by type, and logs
one event per turn (`kobot.turn`, user and chat ids hashed unless KOBOT_LOG_USER_IDS=plain; the
message text is never logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.ops.logs import UserIds
from core.ops.metrics import MetricSet, total
from core.settings import Settings

if TYPE_CHECKING:
    from core.dialogue.trimming import TrimmedPrompt
    from core.generation.base import GenerationResult
    from core.messages import IncomingMessage, Reply

turn_log = logging.getLogger("kobot.turn")
UNHANDLED = "unhandled"

GENERATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


@dataclass
class TurnRecord:
    """What one `DialogueManager.handle` call did, filled in as it runs."""

    platform: str
    user: str
    chat: str
    started: float
    reply: Reply | None = None
    prompt_tokens: int = 0
    new_tokens: int = 0
    dropped_turns: int = 0
    generation_s: float | None = None
    finish_reason: str = ""
    error: str = ""
    command: bool = False

    @property
    def kind(self) -> str:
        if self.reply is None:
            return "cancelled" if self.error == "CancelledError" else "failed"
        return "duplicate" if self.reply.duplicate else str(self.reply.kind)


_current_turn: ContextVar[TurnRecord | None] = ContextVar("kobot_current_turn", default=None)


@dataclass
class TurnCounts:
    """What `/stats` shows that `/metrics` does not: commands, and chat replies (trimmed or not)
    to chat messages (`kobot_replies_total{kind="chat"}` also counts /complete, /story, /retry)."""

    commands: int = 0
    replies: int = 0
    trimmed: int = 0


@dataclass(frozen=True)
class TurnTotals:
    """`/stats`: messages handled, chat replies, commands, errors answered, trimmed messages."""

    messages: int
    replies: int
    commands: int
    errors: int
    trimmed: int


class TurnObserver:
    """Metrics and one log event per turn; the dialogue manager calls it at a few points."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.metrics = MetricSet()
        self.user_ids = UserIds.from_settings(settings) if settings is not None else UserIds()
        self.counts = TurnCounts()
        r = self.metrics
        self.messages = r.counter(
            "kobot_messages_received_total", "Messages handed to the dialogue manager", "platform"
        )
        self.replies = r.counter(
            "kobot_replies_total",
            "Replies handed back to the adapter, by kind (chat, command, notice, error, duplicate)",
            "platform",
            "kind",
        )
        self.latency = r.histogram(
            "kobot_reply_latency_seconds",
            "Message to reply: lock wait, history, generation and storage",
            "platform",
            "kind",
        )
        self.generation = r.histogram(
            "kobot_generation_seconds",
            "Time in the generation backend per reply",
            buckets=GENERATION_BUCKETS_S,
        )
        self.new_tokens = r.counter("kobot_generated_tokens_total", "Tokens generated for replies")
        self.prompt_tokens = r.counter(
            "kobot_prompt_tokens_total", "Prompt tokens sent to generate"
        )
        self.trimmed = r.counter(
            "kobot_prompts_trimmed_total", "Prompts whose oldest turns were dropped to fit"
        )
        self.cut = r.counter(
            "kobot_messages_cut_total", "User messages too long for the window, cut from the left"
        )
        self.errors = r.counter("kobot_errors_total", "Failures by type", "type")

    @contextlib.contextmanager
    def turn(self, message: IncomingMessage) -> Iterator[TurnRecord]:
        """Around one `handle` call: counts it, times it and logs it however it ends."""
        record = TurnRecord(
            message.platform,
            self.user_ids(message.platform, message.user_id),
            self.user_ids(message.platform, message.chat_id),
            time.perf_counter(),
        )
        self.messages.labels(platform=message.platform).inc()
        token = _current_turn.set(record)
        try:
            yield record
        except BaseException as error:
            record.error = type(error).__name__
            if not isinstance(error, asyncio.CancelledError | GeneratorExit):
                self.errors.labels(type=UNHANDLED).inc()
            raise
        finally:
            _current_turn.reset(token)
            self._finish(record)

    def generated(self, prompt: TrimmedPrompt, result: GenerationResult, seconds: float) -> None:
        self.generation.observe(seconds)
        self.new_tokens.inc(result.new_tokens)
        self.prompt_tokens.inc(prompt.n_tokens)
        if prompt.dropped_turns:
            self.trimmed.inc()
        if prompt.newest_trimmed:
            self.cut.inc()
        record = _current_turn.get()
        if record is not None:
            record.prompt_tokens, record.new_tokens = prompt.n_tokens, result.new_tokens
            record.dropped_turns, record.generation_s = prompt.dropped_turns, seconds
            record.finish_reason = str(result.finish_reason)

    def command(self) -> None:
        """The message in this turn is a command (counted for `/stats`)."""
        self.counts.commands += 1
        record = _current_turn.get()
        if record is not None:
            record.command = True

    def error(self, kind: str) -> None:
        self.errors.labels(type=kind).inc()
        record = _current_turn.get()
        if record is not None:
            record.error = kind

    def _finish(self, record: TurnRecord) -> None:
        seconds = time.perf_counter() - record.started
        kind = record.kind
        self.replies.labels(platform=record.platform, kind=kind).inc()
        self.latency.labels(platform=record.platform, kind=kind).observe(seconds)
        if kind == "chat" and not record.command and record.reply is not None:
            self.counts.replies += 1
            self.counts.trimmed += record.reply.trimmed
        fields = self._fields(record, kind, seconds)
        summary = " ".join(f"{key}={value}" for key, value in fields.items() if value != "")
        turn_log.info("turn %s", summary, extra={"event": "turn", "fields": fields})

    def totals(self) -> TurnTotals:
        """What `/stats` shows, read from the counters above (each event is counted once)."""
        errors = total(self.errors) - total(self.errors, type=UNHANDLED)
        messages = int(total(self.messages))
        counts = self.counts
        return TurnTotals(messages, counts.replies, counts.commands, int(errors), counts.trimmed)

    @staticmethod
    def _fields(record: TurnRecord, kind: str, seconds: float) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "platform": record.platform,
            "user": record.user,
            "chat": record.chat,
            "kind": kind,
            "latency_ms": round(seconds * 1000, 1),
        }
        if record.generation_s is not None:
            fields |= {
                "generation_ms": round(record.generation_s * 1000, 1),
                "prompt_tokens": record.prompt_tokens,
                "new_tokens": record.new_tokens,
                "dropped_turns": record.dropped_turns,
                "finish": record.finish_reason,
            }
        if record.error:
            fields["error"] = record.error
        return fields
