"""Platform-neutral message types that flow between adapters, the dialogue manager and storage."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum


class ContextScope(StrEnum):
    """Who shares a context: each user everywhere, each user per chat, or the whole chat."""

    USER = "user"
    USER_IN_CHAT = "user-in-chat"
    CHAT = "chat"


PERSON = "person"  # the platform part of a person's conversation key (linked accounts)


class Role(StrEnum):
    USER = "user"
    AI = "ai"


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Identity of one context. `chat_id` is empty for the `user` scope, `user_id` for `chat`.

    In the `user` scope, an account linked to a person (`/link`) talks in the person's
    conversation, `person::<person id>`, shared by every account of that person."""

    platform: str
    chat_id: str = ""
    user_id: str = ""

    @classmethod
    def for_message(cls, message: IncomingMessage, scope: ContextScope) -> ConversationKey:
        if scope is ContextScope.USER and message.person_id:
            return cls(PERSON, "", message.person_id)
        if scope is ContextScope.USER:
            return cls(message.platform, "", message.user_id)
        if scope is ContextScope.CHAT and not message.is_private:
            return cls(message.platform, message.chat_id, "")
        return cls(message.platform, message.chat_id, message.user_id)

    def as_id(self) -> str:
        """A stable string id, used as the SQL conversation id and inside Redis keys."""
        return f"{self.platform}:{self.chat_id}:{self.user_id}"

    @classmethod
    def from_id(cls, conversation_id: str) -> ConversationKey:
        platform, chat_id, user_id = conversation_id.split(":", 2)
        return cls(platform, chat_id, user_id)


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message from a person, as an adapter hands it to the dialogue manager."""

    platform: str
    user_id: str
    chat_id: str
    text: str
    user_name: str = ""
    message_id: str = ""
    sent_at: datetime = field(default_factory=utc_now)
    is_private: bool = True
    is_admin: bool = False
    private_answer: bool = False  # only the sender sees the answer (an ephemeral Discord one)
    person_id: str = ""  # the person a linked account belongs to: the dialogue manager sets it

    @property
    def answered_privately(self) -> bool:
        """Whether nobody but the sender sees the answer: a private chat or an ephemeral one."""
        return self.is_private or self.private_answer


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored line of a conversation. AI turns carry the user id of the person answered."""

    role: Role
    text: str
    user_id: str
    created_at: datetime = field(default_factory=utc_now)
    message_id: str = ""


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    data: bytes
    mime_type: str = "application/json"


class ReplyKind(StrEnum):
    CHAT = "chat"
    COMMAND = "command"
    NOTICE = "notice"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class Reply:
    """What the adapter sends back. `trimmed` tells that the user's own message was cut.

    `duplicate`: this message was answered (and the answer delivered) before: send nothing.
    `pending_delivery`: the reply is stored in the outbox, waiting to be sent; the adapter
    reports how the send went (`DialogueManager.delivered` / `undeliverable`).
    """

    text: str
    kind: ReplyKind = ReplyKind.CHAT
    trimmed: bool = False
    attachment: Attachment | None = None
    duplicate: bool = False
    pending_delivery: bool = False
