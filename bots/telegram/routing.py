"""Which Telegram messages kobot answers, and how they become platform-neutral messages.

Pure functions over python-telegram-bot objects: no network, no state. The rules:

* messages from bots (this one included) and service messages are ignored;
* private chats: every text (or captioned) message is answered;
* groups: only a message that @mentions the bot, replies to one of its messages, or is a command
  (`/cmd`, or `/cmd@thisbot`; `/cmd@otherbot` and unknown bare commands belong to other bots);
* a message without text (photo, sticker, voice, file...) gets one polite line, when addressed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from telegram import Message, MessageEntity
from telegram.constants import ChatType

from core.dialogue.commands import parse_command
from core.messages import IncomingMessage

PLATFORM = "telegram"
NON_TEXT_REPLY = (
    "아직은 글로 된 메시지만 이해할 수 있어요. 텍스트로 말을 걸어 주세요. "
    "(I only understand text messages for now.)"
)
_EXTRA_SPACES = re.compile(r"[ \t]{2,}")


@dataclass(frozen=True, slots=True)
class BotIdentity:
    """Who the bot is, from `getMe`; `username` is stored without `@`, lower case."""

    id: int
    username: str

    @classmethod
    def create(cls, bot_id: int, username: str) -> BotIdentity:
        return cls(bot_id, username.lstrip("@").lower())


class Route(StrEnum):
    IGNORE = "ignore"
    TEXT = "text"
    NON_TEXT = "non-text"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one message; `text` is what the core sees (the bot's mention removed)."""

    route: Route
    text: str = ""
    reason: str = ""


def ignore(reason: str) -> Decision:
    return Decision(Route.IGNORE, reason=reason)


def decide(message: Message, me: BotIdentity) -> Decision:
    """Answer, politely decline (non-text), or ignore one new message."""
    if message.from_user is None or message.from_user.is_bot:
        return ignore("sent by a bot or a channel")
    text, entities = text_and_entities(message)
    if text is None:
        return _decide_non_text(message, me)
    if not is_private(message) and not _addressed(message, text, entities, me):
        return ignore("group message not addressed to the bot")
    return Decision(Route.TEXT, text=strip_mentions(text, entities, me))


def _decide_non_text(message: Message, me: BotIdentity) -> Decision:
    if message.effective_attachment is None:
        return ignore("service message")
    if is_private(message) or replies_to_bot(message, me):
        return Decision(Route.NON_TEXT)
    return ignore("group media not addressed to the bot")


def is_private(message: Message) -> bool:
    return message.chat.type == ChatType.PRIVATE


def text_and_entities(message: Message) -> tuple[str | None, tuple[MessageEntity, ...]]:
    """The message's text, or its caption (captions are treated as text)."""
    if message.text is not None:
        return message.text, tuple(message.entities)
    if message.caption is not None:
        return message.caption, tuple(message.caption_entities)
    return None, ()


def _addressed(
    message: Message, text: str, entities: tuple[MessageEntity, ...], me: BotIdentity
) -> bool:
    target = command_target(text, entities)
    if target is not None:
        return _command_is_ours(text, target, me)
    return mentions_bot(text, entities, me) or replies_to_bot(message, me)


def command_target(text: str, entities: tuple[MessageEntity, ...]) -> str | None:
    """For a command (a `bot_command` entity at offset 0): the `@bot` it names, "" if none."""
    first = next((e for e in entities if e.offset == 0), None)
    if first is None or first.type != MessageEntity.BOT_COMMAND:
        return None
    command = entity_text(text, first)
    return command.partition("@")[2].lower()


def _command_is_ours(text: str, target: str, me: BotIdentity) -> bool:
    """`/cmd@kobot` always; a bare `/cmd` only when kobot knows it (else another bot's)."""
    if target:
        return target == me.username
    parsed = parse_command(text)
    return parsed is not None and parsed.command is not None


def mentions_bot(text: str, entities: tuple[MessageEntity, ...], me: BotIdentity) -> bool:
    return any(_is_our_mention(text, entity, me) for entity in entities)


def _is_our_mention(text: str, entity: MessageEntity, me: BotIdentity) -> bool:
    if entity.type == MessageEntity.TEXT_MENTION:
        return entity.user is not None and entity.user.id == me.id
    if entity.type == MessageEntity.MENTION:
        return entity_text(text, entity).lstrip("@").lower() == me.username
    return False


def replies_to_bot(message: Message, me: BotIdentity) -> bool:
    """A reply to one of the bot's messages (a forum topic's implicit reply does not count)."""
    replied = message.reply_to_message
    if replied is None or replied.forum_topic_created is not None:
        return False
    return replied.from_user is not None and replied.from_user.id == me.id


def entity_text(text: str, entity: MessageEntity) -> str:
    """The entity's text; Telegram counts offsets and lengths in UTF-16 code units."""
    encoded = text.encode("utf-16-le")
    start, end = 2 * entity.offset, 2 * (entity.offset + entity.length)
    return encoded[start:end].decode("utf-16-le", errors="ignore")


def strip_mentions(text: str, entities: tuple[MessageEntity, ...], me: BotIdentity) -> str:
    """The text without the bot's own @mentions (other names stay: they are content)."""
    encoded = text.encode("utf-16-le")
    ours = sorted(
        (e for e in entities if _is_our_mention(text, e, me)), key=lambda e: e.offset, reverse=True
    )
    for entity in ours:
        encoded = encoded[: 2 * entity.offset] + encoded[2 * (entity.offset + entity.length) :]
    stripped = encoded.decode("utf-16-le", errors="ignore")
    return _EXTRA_SPACES.sub(" ", stripped).strip() if ours else text


def to_incoming(message: Message, text: str, admins: frozenset[int]) -> IncomingMessage:
    """The core's view of a message; `message_id` is unique per chat for restart dedup."""
    user = message.from_user
    if user is None:
        raise ValueError("a message without a sender cannot be answered")
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(user.id),
        chat_id=str(message.chat.id),
        text=text,
        user_name=user.username or user.full_name,
        message_id=f"{message.chat.id}:{message.message_id}",
        sent_at=message.date,
        is_private=is_private(message),
        is_admin=user.id in admins,
    )
