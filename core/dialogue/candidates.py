"""Unused reply candidates per conversation, for `/retry` (in memory, bounded)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from core.messages import ConversationKey

MAX_SEEN = 64


@dataclass
class _Pending:
    question: str
    shown: str
    left: deque[str]
    seen: set[str] = field(default_factory=set)


class Candidates:
    """For each conversation's last exchange: the reply shown and the candidates not shown yet.

    An entry is used only while the stored exchange is still (question, shown reply): after a
    new message, a reset or another process's retry it no longer matches and is dropped. Lost
    on restart (then `/retry` generates new candidates), bounded in conversations and size.
    """

    def __init__(self, max_conversations: int = 10_000, max_candidates: int = 8) -> None:
        self._entries: OrderedDict[ConversationKey, _Pending] = OrderedDict()
        self._max_conversations = max_conversations
        self._max_candidates = max_candidates

    def keep(self, key: ConversationKey, question: str, shown: str, others: Iterable[str]) -> None:
        """Remember the candidates of a fresh answer to `question` (after a new message)."""
        self._store(key, _Pending(question, shown, deque(), {shown}), others)

    def add(self, key: ConversationKey, question: str, shown: str, others: Iterable[str]) -> None:
        """After a `/retry` that generated again: `shown` replaces the reply, `others` wait;
        replies seen before for the same question stay known (`is_new`)."""
        entry = self._matching(key, question)
        seen = entry.seen if entry is not None else set()
        self._store(key, _Pending(question, shown, deque(), seen | {shown}), others)

    def take(self, key: ConversationKey, question: str, shown: str) -> str | None:
        """The next unused candidate, if the stored exchange still is (question, shown); it
        becomes the shown reply."""
        entry = self._entries.get(key)
        if entry is None or (entry.question, entry.shown) != (question, shown):
            self._entries.pop(key, None)
            return None
        if not entry.left:
            return None
        entry.shown = entry.left.popleft()
        self._entries.move_to_end(key)
        return entry.shown

    def is_new(self, key: ConversationKey, question: str, text: str) -> bool:
        """Whether `text` was never shown as an answer to `question` here."""
        entry = self._matching(key, question)
        return entry is None or text not in entry.seen

    def forget(self, key: ConversationKey) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)

    def _matching(self, key: ConversationKey, question: str) -> _Pending | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.question == question else None

    def _store(self, key: ConversationKey, entry: _Pending, others: Iterable[str]) -> None:
        if len(entry.seen) > MAX_SEEN:
            entry.seen = {entry.shown}
        for text in others:
            if text not in entry.seen and len(entry.left) < self._max_candidates:
                entry.left.append(text)
                entry.seen.add(text)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_conversations:
            self._entries.popitem(last=False)
