"""Which Discord messages kobot answers, and how they become platform-neutral messages: bots,
webhooks and system messages are ignored; mentions are made readable for the model."""

from __future__ import annotations

import re

import discord

from bots.access import Place
from bots.discord.commands import PRIVATE_COMMANDS
from core.dialogue.commands import Command
from core.messages import IncomingMessage

PLATFORM = "discord"


USER_MESSAGE_TYPES = frozenset({discord.MessageType.default, discord.MessageType.reply})


def place_of(user: discord.abc.User, guild_id: int | None, channel: object) -> Place:
    """For the access policy; a DM is tied to no channel, guild or role (no members intent)."""
    if guild_id is None:
        return Place()
    return Place(channel_ids(channel), guild_id, role_ids(user))


def role_ids(user: discord.abc.User) -> frozenset[int]:
    if not isinstance(user, discord.Member):
        return frozenset()
    return frozenset(role.id for role in user.roles)


def channel_ids(channel: object) -> frozenset[int]:
    """The channel's id, and for a thread its parent channel's too."""
    parent_id = channel.parent_id if isinstance(channel, discord.Thread) else None
    return frozenset(i for i in (getattr(channel, "id", None), parent_id) if i is not None)


def in_channels(channel: object, listed: frozenset[int]) -> bool:
    """True for a listed channel, or a thread whose parent channel is listed."""
    return bool(channel_ids(channel) & listed)


def is_from_person(message: discord.Message) -> bool:
    """Not a bot (this one included), not a webhook, not a system message."""
    return (
        not message.author.bot
        and message.webhook_id is None
        and not message.author.system
        and message.type in USER_MESSAGE_TYPES
    )


def self_role_id(message: discord.Message) -> int | None:
    role = message.guild.self_role if message.guild is not None else None
    return role.id if role is not None else None


def mentions_bot(message: discord.Message, bot_id: int) -> bool:
    return bot_id in message.raw_mentions or self_role_id(message) in message.raw_role_mentions


def replies_to_bot(message: discord.Message, bot_id: int) -> bool:
    reference = message.reference
    if reference is None:
        return False
    replied = reference.resolved or reference.cached_message
    return isinstance(replied, discord.Message) and replied.author.id == bot_id


# ---------------------------------------------------------------------------------------------
# Translation: Discord → core


_MENTION = re.compile(r"<(@[!&]?|#)(\d+)>")


def mention_names(message: discord.Message, bot_id: int) -> dict[str, str]:
    """Raw mention → readable text for the model; the bot's own mentions become nothing."""
    names = {f"<@{u.id}>": f"@{u.display_name}" for u in message.mentions}
    names |= {f"<@!{u.id}>": f"@{u.display_name}" for u in message.mentions}
    names |= {f"<@&{r.id}>": f"@{r.name}" for r in message.role_mentions}
    names |= {f"<#{c.id}>": f"#{getattr(c, 'name', c.id)}" for c in message.channel_mentions}
    names |= {f"<@{bot_id}>": "", f"<@!{bot_id}>": ""}
    role = self_role_id(message)
    if role is not None:
        names[f"<@&{role}>"] = ""
    return names


def message_text(message: discord.Message, bot_id: int) -> str:
    """The words said to the bot: its mentions removed, other mentions made readable."""
    names = mention_names(message, bot_id)
    text = _MENTION.sub(lambda m: names.get(m.group(0), m.group(0)), message.content)
    return re.sub(r"[ \t]{2,}", " ", text).strip()


def has_media(message: discord.Message) -> bool:
    return bool(message.attachments or message.stickers or message.embeds)


def incoming_message(
    message: discord.Message, text: str, admins: frozenset[int]
) -> IncomingMessage:
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(message.author.id),
        chat_id=str(message.channel.id),
        text=text,
        user_name=message.author.display_name,
        message_id=str(message.id),
        sent_at=message.created_at,
        is_private=message.guild is None,
        is_admin=message.author.id in admins,
    )


def command_message(
    interaction: discord.Interaction, command: Command, argument: str, admins: frozenset[int]
) -> IncomingMessage:
    """A slash command as the text command the core parses (`/persona 친절한 선생님`)."""
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(interaction.user.id),
        chat_id=str(interaction.channel_id or interaction.user.id),
        text=f"/{command.value} {argument}".strip(),
        user_name=interaction.user.display_name,
        message_id=str(interaction.id),
        sent_at=interaction.created_at,
        is_private=interaction.guild_id is None,
        is_admin=interaction.user.id in admins,
        private_answer=command in PRIVATE_COMMANDS,  # answered ephemerally (`on_command`)
    )
