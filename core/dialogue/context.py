"""Where each conversation's prompt starts: the oldest turn kept after the last trim."""

from __future__ import annotations

from collections import OrderedDict

from core.dialogue.trimming import TrimmedPrompt
from core.messages import ConversationKey, Role, Turn


class ContextStarts:
    """Per conversation, the oldest turn still in the prompt after the last trim.

    Once old turns are dropped they stay dropped, so consecutive prompts share a prefix and a
    backend can reuse its KV cache until the next trim (see `trim_prompt`'s `low_water`).
    """

    def __init__(self, max_conversations: int = 10_000) -> None:
        self._first: OrderedDict[ConversationKey, Turn] = OrderedDict()
        self._max = max_conversations

    def since(
        self, key: ConversationKey, history: list[Turn], limit: int, low_water: float
    ) -> list[Turn]:
        """The history from the remembered start. When the turn limit slides past that start,
        a new start is chosen `low_water` of the limit from the end, so the limit too drops old
        turns in chunks rather than one exchange per message."""
        first = self._first.get(key)
        if first is not None and first in history:
            return history[history.index(first) :]
        if len(history) < limit:
            return history
        start = _first_user_turn(history, len(history) - int(limit * low_water))
        self._remember(key, history[start])
        return history[start:]

    def _remember(self, key: ConversationKey, turn: Turn) -> None:
        self._first[key] = turn
        self._first.move_to_end(key)

    def update(self, key: ConversationKey, history: list[Turn], prompt: TrimmedPrompt) -> None:
        if prompt.dropped_turns and prompt.kept_turns:
            self._remember(key, history[prompt.dropped_turns])
        elif prompt.dropped_turns:
            self._first.pop(key, None)
        while len(self._first) > self._max:
            self._first.popitem(last=False)

    def forget(self, key: ConversationKey) -> None:
        self._first.pop(key, None)


def _first_user_turn(history: list[Turn], start: int) -> int:
    """`start`, moved forward to a user turn so the history never opens with an AI line."""
    while start < len(history) - 1 and history[start].role is not Role.USER:
        start += 1
    return start
