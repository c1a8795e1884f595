"""The storage interface every backend implements, and its one error type."""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from core.messages import ConversationKey, Turn


def mask_url_password(url: str) -> str:
    """`url` (or a message holding URLs) with every password replaced by asterisks."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1********@", url)


class StorageError(Exception):
    """Any failure of a storage driver (connection lost, timeout, bad schema...)."""


class Delivery(StrEnum):
    """Where a stored reply stands with the platform (the outbox).

    `pending`: stored with the AI turn, not yet known to be sent; `sent`: the platform accepted
    it (its message ids are kept); `failed`: refused for good (chat gone, bot blocked), never
    tried again. Replies stored before the outbox existed count as sent.
    """

    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StoredReply:
    """The AI turn answering one message, with its delivery state."""

    text: str
    delivery: Delivery
    sent_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """How the reply to one message went: its new state and the platform's message ids."""

    message_id: str
    delivery: Delivery
    sent_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class InboxItem:
    """One received update or message (the inbox), stored before the platform is told it
    arrived. `item_id` is unique per platform; `lane` orders the items of one conversation;
    `payload` is what the adapter needs to handle it again after a restart (JSON)."""

    platform: str
    item_id: str
    lane: str
    payload: str
    note: str = ""  # what handling it left behind so far (a streamed message's id)


@dataclass(frozen=True, slots=True, order=True)
class Account:
    """One account on one platform (a Telegram user, a Discord user)."""

    platform: str
    user_id: str


@dataclass(frozen=True, slots=True)
class LinkCode:
    """A pending `/link` code: only its `digest` is stored, never the code itself."""

    digest: str
    account: Account
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class UserExport:
    """Everything stored about one user, ready for `json.dumps` via `as_dict`."""

    platform: str
    user_id: str
    conversations: dict[str, list[Turn]] = field(default_factory=dict)
    personas: dict[str, str] = field(default_factory=dict)
    linked_accounts: tuple[Account, ...] = ()  # when the export covers a person's accounts

    def as_dict(self) -> dict[str, object]:
        linked = [{"platform": a.platform, "user_id": a.user_id} for a in self.linked_accounts]
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
            **({"linked_accounts": linked} if linked else {}),
        }


class Storage(abc.ABC):
    """Durable conversation history, per-conversation personas and context resets.

    `clear` starts a fresh context: `recent` returns nothing stored before it, while the turns
    stay in the durable history for `export_user` until `delete_user` or retention removes them.
    """

    @abc.abstractmethod
    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        """Store the turns atomically, in order, after everything already stored for `key`;
        the AI turns among them get the `delivery` state in the same transaction."""

    @abc.abstractmethod
    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        """The newest `limit` turns since the last `clear`, oldest first."""

    @abc.abstractmethod
    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        """The AI turn answering `message_id`, if any: the one a `/retry` with this id made
        (`replace_last_reply`), else the one stored right after the user turn with this id."""

    @abc.abstractmethod
    async def reply_to(self, key: ConversationKey, message_id: str) -> StoredReply | None:
        """`find_reply` with the reply's delivery state (the outbox)."""

    @abc.abstractmethod
    async def set_delivery(self, key: ConversationKey, record: DeliveryRecord) -> bool:
        """Record how the reply to `record.message_id` went; False when there is no such reply."""

    @abc.abstractmethod
    async def inbox_add(self, items: Sequence[InboxItem]) -> list[InboxItem]:
        """Store the items not stored yet, in one transaction; returns those that were new
        (idempotent: an item seen again, finished or not, is not new)."""

    @abc.abstractmethod
    async def inbox_pending(self, platform: str) -> list[InboxItem]:
        """The platform's unfinished items, in the order they were added."""

    @abc.abstractmethod
    async def inbox_note(self, platform: str, item_id: str, note: str) -> None:
        """Remember `note` with an unfinished item (`inbox_pending` returns it)."""

    @abc.abstractmethod
    async def inbox_done(self, platform: str, item_id: str) -> None:
        """Mark an item finished (it stays known, so a redelivery is still not new)."""

    @abc.abstractmethod
    async def inbox_prune(self, before: datetime) -> int:
        """Forget finished items added before `before`; returns how many."""

    @abc.abstractmethod
    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        """Give the newest turn since the last `clear` the new `text` if it is an AI turn
        (`/retry`); False, changing nothing, when there is no such turn.

        With the retry's `message_id`, the turn also answers that id from now on (`reply_to`,
        `find_reply`, `set_delivery` find it; it is the AI turn's own `message_id`) and waits
        in the outbox (`pending`) until its new text is sent: a redelivered retry is then
        answered from storage instead of replacing the reply again."""

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
    async def link_code_put(self, code: LinkCode) -> None:
        """Store `code`, replacing any earlier code of the same account (one pending code per
        account), and drop every code that has expired."""

    @abc.abstractmethod
    async def link_code_take(self, digest: str, now: datetime) -> Account | None:
        """Remove the code with this digest and return its account, or None when there is no
        such code or it expired before `now`. Single use: of two takes, one at most succeeds."""

    @abc.abstractmethod
    async def person_of(self, account: Account) -> str | None:
        """The id of the person this account is linked to, if any."""

    @abc.abstractmethod
    async def accounts_of(self, person_id: str) -> list[Account]:
        """Every account linked to the person, sorted."""

    @abc.abstractmethod
    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        """Make each account part of the person, in one transaction (moving it from any other)."""

    @abc.abstractmethod
    async def unlink(self, account: Account) -> bool:
        """Remove the account from its person; False when it was not linked."""

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


class StorageWrapper(Storage):
    """A storage in front of another (`inner`): every call passes through unchanged; a wrapper
    (the Redis cache, a test's spy) overrides only what it adds to."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner

    @property
    def inner(self) -> Storage:
        return self._inner

    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        await self._inner.append(key, turns, delivery)

    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        return await self._inner.recent(key, limit)

    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        return await self._inner.find_reply(key, message_id)

    async def reply_to(self, key: ConversationKey, message_id: str) -> StoredReply | None:
        return await self._inner.reply_to(key, message_id)

    async def set_delivery(self, key: ConversationKey, record: DeliveryRecord) -> bool:
        return await self._inner.set_delivery(key, record)

    async def inbox_add(self, items: Sequence[InboxItem]) -> list[InboxItem]:
        return await self._inner.inbox_add(items)

    async def inbox_pending(self, platform: str) -> list[InboxItem]:
        return await self._inner.inbox_pending(platform)

    async def inbox_note(self, platform: str, item_id: str, note: str) -> None:
        await self._inner.inbox_note(platform, item_id, note)

    async def inbox_done(self, platform: str, item_id: str) -> None:
        await self._inner.inbox_done(platform, item_id)

    async def inbox_prune(self, before: datetime) -> int:
        return await self._inner.inbox_prune(before)

    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        return await self._inner.replace_last_reply(key, text, message_id)

    async def clear(self, key: ConversationKey) -> None:
        await self._inner.clear(key)

    async def delete_user(self, platform: str, user_id: str) -> int:
        return await self._inner.delete_user(platform, user_id)

    async def export_user(self, platform: str, user_id: str) -> UserExport:
        return await self._inner.export_user(platform, user_id)

    async def get_persona(self, key: ConversationKey) -> str | None:
        return await self._inner.get_persona(key)

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        await self._inner.set_persona(key, persona)

    async def link_code_put(self, code: LinkCode) -> None:
        await self._inner.link_code_put(code)

    async def link_code_take(self, digest: str, now: datetime) -> Account | None:
        return await self._inner.link_code_take(digest, now)

    async def person_of(self, account: Account) -> str | None:
        return await self._inner.person_of(account)

    async def accounts_of(self, person_id: str) -> list[Account]:
        return await self._inner.accounts_of(person_id)

    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        await self._inner.link(person_id, accounts)

    async def unlink(self, account: Account) -> bool:
        return await self._inner.unlink(account)

    async def purge_before(self, cutoff: datetime) -> int:
        return await self._inner.purge_before(cutoff)

    async def stats(self) -> dict[str, int]:
        return await self._inner.stats()

    async def ping(self) -> str:
        return await self._inner.ping()

    async def close(self) -> None:
        await self._inner.close()
