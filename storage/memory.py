"""In-process storage: the embedded default without a database, and the reference for tests.

Everything lives in dictionaries of one process and is lost when it exits. No method awaits
while it changes state, so every operation is atomic within the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from core.messages import ConversationKey, Role, Turn, utc_now
from storage.base import (
    Account,
    Delivery,
    DeliveryRecord,
    InboxItem,
    LinkCode,
    Storage,
    StoredReply,
    UserExport,
)


def to_utc(moment: datetime) -> datetime:
    """The same instant as an aware UTC datetime; a naive datetime is taken to be UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


@dataclass(slots=True)
class _Conversation:
    key: ConversationKey
    persona: str | None = None
    context_start: int = 0
    turns: list[tuple[int, Turn]] = field(default_factory=list)
    deliveries: dict[int, tuple[Delivery, tuple[str, ...]]] = field(default_factory=dict)

    def belongs_to(self, platform: str, user_id: str) -> bool:
        return self.key.platform == platform and self.key.user_id == user_id

    def reply_index(self, message_id: str) -> int | None:
        """The index of the AI turn answering `message_id`: the one a `/retry` with this id
        made, else the one right after the newest user turn with `message_id`."""
        for index in range(len(self.turns) - 1, -1, -1):
            turn = self.turns[index][1]
            if turn.role is Role.AI and turn.message_id == message_id:
                return index
        return self._answer_index(message_id)

    def _answer_index(self, message_id: str) -> int | None:
        for index in range(len(self.turns) - 1, -1, -1):
            turn = self.turns[index][1]
            if turn.role is Role.USER and turn.message_id == message_id:
                following = index + 1
                if following < len(self.turns) and self.turns[following][1].role is Role.AI:
                    return following
                return None
        return None


@dataclass(slots=True)
class _InboxEntry:
    item: InboxItem
    added_at: datetime
    done: bool = False


class MemoryStorage(Storage):
    """Conversations in a dict; turn ids from one counter that never goes back (like SQL)."""

    def __init__(self) -> None:
        self._conversations: dict[str, _Conversation] = {}
        self._last_turn_id = 0
        self._inbox: dict[tuple[str, str], _InboxEntry] = {}  # insertion order is arrival order
        self._link_codes: dict[str, LinkCode] = {}  # by digest
        self._people: dict[Account, str] = {}  # account → person id

    def _conversation(self, key: ConversationKey) -> _Conversation:
        return self._conversations.setdefault(key.as_id(), _Conversation(key))

    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        if not turns:
            return
        conversation = self._conversation(key)
        for turn in turns:
            self._last_turn_id += 1
            stored = replace(turn, created_at=to_utc(turn.created_at))
            conversation.turns.append((self._last_turn_id, stored))
            if delivery is not None and turn.role is Role.AI:
                conversation.deliveries[self._last_turn_id] = (delivery, ())

    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        conversation = self._conversations.get(key.as_id())
        if conversation is None or limit <= 0:
            return []
        visible = [t for turn_id, t in conversation.turns if turn_id > conversation.context_start]
        return visible[-limit:]

    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        conversation = self._conversations.get(key.as_id())
        index = conversation.reply_index(message_id) if conversation and message_id else None
        return None if conversation is None or index is None else conversation.turns[index][1]

    async def reply_to(self, key: ConversationKey, message_id: str) -> StoredReply | None:
        conversation = self._conversations.get(key.as_id())
        index = conversation.reply_index(message_id) if conversation and message_id else None
        if conversation is None or index is None:
            return None
        turn_id, turn = conversation.turns[index]
        delivery, sent_ids = conversation.deliveries.get(turn_id, (Delivery.SENT, ()))
        return StoredReply(turn.text, delivery, sent_ids)

    async def set_delivery(self, key: ConversationKey, record: DeliveryRecord) -> bool:
        conversation = self._conversations.get(key.as_id())
        message_id = record.message_id
        index = conversation.reply_index(message_id) if conversation and message_id else None
        if conversation is None or index is None:
            return False
        conversation.deliveries[conversation.turns[index][0]] = (record.delivery, record.sent_ids)
        return True

    async def inbox_add(self, items: Sequence[InboxItem]) -> list[InboxItem]:
        new: list[InboxItem] = []
        for item in items:
            if (item.platform, item.item_id) not in self._inbox:
                self._inbox[(item.platform, item.item_id)] = _InboxEntry(item, utc_now())
                new.append(item)
        return new

    async def inbox_pending(self, platform: str) -> list[InboxItem]:
        return [e.item for e in self._inbox.values() if e.item.platform == platform and not e.done]

    async def inbox_note(self, platform: str, item_id: str, note: str) -> None:
        entry = self._inbox.get((platform, item_id))
        if entry is not None:
            entry.item = replace(entry.item, note=note)

    async def inbox_done(self, platform: str, item_id: str) -> None:
        entry = self._inbox.get((platform, item_id))
        if entry is not None:
            entry.done = True

    async def inbox_prune(self, before: datetime) -> int:
        before = to_utc(before)
        old = [name for name, e in self._inbox.items() if e.done and e.added_at < before]
        for name in old:
            del self._inbox[name]
        return len(old)

    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        conversation = self._conversations.get(key.as_id())
        if conversation is None or not conversation.turns:
            return False
        turn_id, last = conversation.turns[-1]
        if turn_id <= conversation.context_start or last.role is not Role.AI:
            return False
        if not message_id:
            conversation.turns[-1] = (turn_id, replace(last, text=text))
            return True
        conversation.turns[-1] = (turn_id, replace(last, text=text, message_id=message_id))
        conversation.deliveries[turn_id] = (Delivery.PENDING, ())
        return True

    async def clear(self, key: ConversationKey) -> None:
        conversation = self._conversation(key)
        conversation.context_start = conversation.turns[-1][0] if conversation.turns else 0

    async def delete_user(self, platform: str, user_id: str) -> int:
        deleted = 0
        for conversation_id, conversation in list(self._conversations.items()):
            if conversation.belongs_to(platform, user_id):
                deleted += len(conversation.turns)
                del self._conversations[conversation_id]
            elif conversation.key.platform == platform:
                kept = [(i, t) for i, t in conversation.turns if t.user_id != user_id]
                deleted += len(conversation.turns) - len(kept)
                conversation.turns = kept
        return deleted

    async def export_user(self, platform: str, user_id: str) -> UserExport:
        export = UserExport(platform, user_id)
        ordered = sorted(
            (turn_id, conversation_id, turn)
            for conversation_id, conversation in self._conversations.items()
            if conversation.key.platform == platform
            for turn_id, turn in conversation.turns
            if turn.user_id == user_id
        )
        for _, conversation_id, turn in ordered:
            export.conversations.setdefault(conversation_id, []).append(turn)
        for conversation_id, conversation in self._conversations.items():
            if conversation.belongs_to(platform, user_id) and conversation.persona is not None:
                export.personas[conversation_id] = conversation.persona
        return export

    async def get_persona(self, key: ConversationKey) -> str | None:
        conversation = self._conversations.get(key.as_id())
        return conversation.persona if conversation else None

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        self._conversation(key).persona = persona

    async def link_code_put(self, code: LinkCode) -> None:
        now = utc_now()
        for digest, pending in list(self._link_codes.items()):
            if pending.account == code.account or to_utc(pending.expires_at) <= now:
                del self._link_codes[digest]
        self._link_codes[code.digest] = replace(code, expires_at=to_utc(code.expires_at))

    async def link_code_take(self, digest: str, now: datetime) -> Account | None:
        code = self._link_codes.pop(digest, None)
        if code is None or code.expires_at <= to_utc(now):
            return None
        return code.account

    async def person_of(self, account: Account) -> str | None:
        return self._people.get(account)

    async def accounts_of(self, person_id: str) -> list[Account]:
        return sorted(account for account, person in self._people.items() if person == person_id)

    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        for account in accounts:
            self._people[account] = person_id

    async def unlink(self, account: Account) -> bool:
        return self._people.pop(account, None) is not None

    async def purge_before(self, cutoff: datetime) -> int:
        cutoff = to_utc(cutoff)
        deleted = 0
        for conversation in self._conversations.values():
            kept = [(i, t) for i, t in conversation.turns if t.created_at >= cutoff]
            deleted += len(conversation.turns) - len(kept)
            conversation.turns = kept
        return deleted

    async def stats(self) -> dict[str, int]:
        turns = [(c.key.platform, t) for c in self._conversations.values() for _, t in c.turns]
        return {
            "turns": len(turns),
            "users": len({(platform, turn.user_id) for platform, turn in turns}),
            "conversations": len(self._conversations),
        }
