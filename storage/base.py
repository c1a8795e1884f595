"""The storage interface every backend implements, and its one error type."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from core.messages import ConversationKey, Turn


class StorageError(Exception):
    """Any failure of a storage driver (connection lost, timeout, bad schema...)."""


@dataclass(frozen=True, slots=True)
class UserExport:
    """Everything stored about one user, ready for `json.dumps` via `as_dict`."""

    platform: str
    user_id: str
    conversations: dict[str, list[Turn]] = field(default_factory=dict)
    personas: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "platform": self.platform,
            "user_id": self.user_id,
            "conversations": {
                conversation_id: [
                    {
                        "role": str(turn.role),
                        "text": turn.text,
                        "created_at": turn.created_at.isoformat(),
                        "message_id": turn.message_id,
                    }
                    for turn in turns
                ]
                for conversation_id, turns in self.conversations.items()
            },
            "personas": dict(self.personas),
        }


class Storage(abc.ABC):
    """Durable conversation history, per-conversation personas and context resets.

    `clear` starts a fresh context: `recent` returns nothing stored before it, while the turns
    stay in the durable history for `export_user` until `delete_user` or retention removes them.
    """

    @abc.abstractmethod
    async def append(self, key: ConversationKey, turns: Sequence[Turn]) -> None:
        """Store the turns atomically, in order, after everything already stored for `key`."""

    @abc.abstractmethod
    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        """The newest `limit` turns since the last `clear`, oldest first."""

    @abc.abstractmethod
    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        """The AI turn stored right after the user turn with this `message_id`, if any."""

    @abc.abstractmethod
    async def replace_last_reply(self, key: ConversationKey, text: str) -> bool:
        """Give the newest turn since the last `clear` the new `text` if it is an AI turn
        (`/retry`); False, changing nothing, when there is no such turn."""

    @abc.abstractmethod
    async def clear(self, key: ConversationKey) -> None:
        """Forget the context of one conversation (its durable history stays)."""

    @abc.abstractmethod
    async def delete_user(self, platform: str, user_id: str) -> int:
        """Delete every turn by or for this user and the personas of their conversations."""

    @abc.abstractmethod
    async def export_user(self, platform: str, user_id: str) -> UserExport:
        """Every stored turn by or for this user, grouped by conversation, oldest first."""

    @abc.abstractmethod
    async def get_persona(self, key: ConversationKey) -> str | None: ...

    @abc.abstractmethod
    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        """Set this conversation's persona; `None` clears it (the default persona applies)."""

    @abc.abstractmethod
    async def purge_before(self, cutoff: datetime) -> int:
        """Delete turns created before `cutoff`; returns how many were deleted."""

    @abc.abstractmethod
    async def stats(self) -> dict[str, int]:
        """Counts for admins: at least `turns`, `users`, `conversations`."""

    async def ping(self) -> str:
        """Reach the store now (health checks): a short description of it, or raise.

        A store that holds no connection answers by existing."""
        return type(self).__name__

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
