"""Discord messages in the storage inbox: nothing lost when the bot dies, nothing twice.

Discord does not deliver a message again after a restart, and replays it after a resume. So each
message the bot will answer is stored first (keyed by its snowflake id): a message seen again is
a no-op, and at start-up the stored ones not yet finished are answered (the core's outbox sends
a reply that was stored but not sent without generating it again).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime

from core.messages import IncomingMessage
from storage.base import InboxItem, Storage, StorageError

log = logging.getLogger(__name__)
PLATFORM = "discord"


def encode_incoming(message: IncomingMessage) -> str:
    return json.dumps(
        {
            "user_id": message.user_id,
            "chat_id": message.chat_id,
            "text": message.text,
            "user_name": message.user_name,
            "message_id": message.message_id,
            "sent_at": message.sent_at.isoformat(),
            "is_private": message.is_private,
            "is_admin": message.is_admin,
        },
        ensure_ascii=False,
    )


def decode_incoming(payload: str) -> IncomingMessage:
    data = json.loads(payload)
    data["sent_at"] = datetime.fromisoformat(data["sent_at"])
    return IncomingMessage(platform=PLATFORM, **data)


class DiscordInbox:
    """Which messages were seen, and which of them are finished."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._streamed: dict[str, int] = {}  # message id -> the reply a dead run streamed into

    async def first_sighting(self, message: IncomingMessage) -> bool:
        """Store the message; False when it was stored before (a replay: nothing to do). When
        storage fails it is answered anyway (answering beats dropping it)."""
        item = InboxItem(PLATFORM, message.message_id, message.chat_id, encode_incoming(message))
        try:
            return bool(await self._storage.inbox_add([item]))
        except StorageError as error:
            log.warning("could not store a received message (%s); answering it anyway", error)
            return True

    async def unfinished(self) -> list[IncomingMessage]:
        """The messages a previous run stored but did not finish, oldest first."""
        try:
            items = await self._storage.inbox_pending(PLATFORM)
        except StorageError as error:
            log.warning("could not read unfinished messages (%s)", error)
            return []
        for item in items:
            if item.note.isdigit():
                self._streamed[item.item_id] = int(item.note)
        return [decode_incoming(item.payload) for item in items]

    def streamed_before(self, message: IncomingMessage) -> int | None:
        """The reply message a previous run began streaming into, if any."""
        return self._streamed.pop(message.message_id, None)

    async def note_streamed(self, message: IncomingMessage, reply_id: int) -> None:
        """Remember the message a reply streams into (a restart finishes that one)."""
        try:
            await self._storage.inbox_note(PLATFORM, message.message_id, str(reply_id))
        except StorageError as error:
            log.warning("could not note a streamed message: %s", error)

    async def done(self, message: IncomingMessage) -> None:
        try:
            await self._storage.inbox_done(PLATFORM, message.message_id)
        except StorageError as error:
            log.warning("could not mark a message finished (%s)", error)
