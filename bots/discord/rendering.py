"""The core's replies as Discord messages: markdown escaped, mentions broken, split at
Discord's limit; only the first chunk may ping its author; how a send went."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import AsyncIterator, Awaitable

import aiohttp
import discord
from discord.abc import Messageable

from bots.outbox import Outcome, Sent
from core.messages import Attachment, Reply
from core.text import split_message, utf16_length

log = logging.getLogger(__name__)

MESSAGE_LIMIT = 2000


TYPING_REFRESH_S = 8.0  # one typing indicator lasts about 10 s


NO_MENTIONS = discord.AllowedMentions.none()
REPLY_MENTION = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)


FILE_IN_PRIVATE = (
    "기록 파일은 /export 슬래시 명령으로 나에게만 보이게 보내 드려요. "
    "(Use the /export slash command to get the file privately.)"
)


def displayable(text: str) -> str:
    """Core text shown as text: markdown escaped, mentions broken with a zero-width space."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def chunks_of(reply: Reply) -> list[str]:
    """Discord-sized pieces, split on paragraph, line or sentence ends (Korean included)."""
    return split_message(displayable(reply.text), MESSAGE_LIMIT, utf16_length) or ["…"]


def files_of(attachment: Attachment | None) -> list[discord.File]:
    if attachment is None:
        return []
    return [discord.File(io.BytesIO(attachment.data), filename=attachment.filename)]


def without_public_file(reply: Reply, private: bool) -> Reply:
    """A history file is personal: in a server channel, point to the ephemeral /export instead."""
    if private or reply.attachment is None:
        return reply
    return Reply(f"{reply.text}\n{FILE_IN_PRIVATE}", reply.kind)


AnyMessage = discord.Message | discord.PartialMessage  # partial: one taken up after a restart


async def send_reply(message: AnyMessage, reply: Reply) -> list[str]:
    """Send `reply` as replies to `message`, in order; only the first may ping its author.
    Returns the ids of the messages sent."""
    chunks = chunks_of(reply)
    reference = message.to_reference(fail_if_not_exists=False)
    sent: list[str] = []
    for index, chunk in enumerate(chunks):
        posted = await message.channel.send(
            chunk,
            reference=reference,
            allowed_mentions=REPLY_MENTION if index == 0 else NO_MENTIONS,
            files=files_of(reply.attachment) if index == len(chunks) - 1 else [],
        )
        sent.append(str(posted.id))
    return sent


async def respond(interaction: discord.Interaction, reply: Reply, ephemeral: bool) -> list[str]:
    """Answer an interaction (or follow up after a defer), file on the last chunk; the ids of
    the messages sent."""
    chunks = chunks_of(reply)
    sent: list[str] = []
    for index, chunk in enumerate(chunks):
        files = files_of(reply.attachment) if index == len(chunks) - 1 else []
        if interaction.response.is_done():
            posted = await interaction.followup.send(
                chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS, files=files, wait=True
            )
            sent.append(str(posted.id))
        else:
            answered = await interaction.response.send_message(
                chunk, ephemeral=ephemeral, allowed_mentions=NO_MENTIONS, files=files
            )
            sent.append(str(answered.message_id or interaction.id))
    return sent


async def _keep_typing(channel: Messageable) -> None:
    while True:
        with contextlib.suppress(discord.HTTPException):
            await channel.typing()
        await asyncio.sleep(TYPING_REFRESH_S)


@contextlib.asynccontextmanager
async def typing_shown(channel: Messageable) -> AsyncIterator[None]:
    """Typing indicator while the block runs; a failed typing request never blocks the reply."""
    task = asyncio.create_task(_keep_typing(channel))
    try:
        yield
    finally:
        task.cancel()


async def outcome_of(sending: Awaitable[list[str]]) -> Sent:
    """How sending a reply went (the ids of its messages when it was sent)."""
    try:
        return Sent(Outcome.SENT, tuple(await sending))
    except (discord.Forbidden, discord.NotFound) as error:
        log.warning("cannot answer in this channel (%s %s)", error.status, error.text)
        return Sent(Outcome.REFUSED)
    except (discord.HTTPException, aiohttp.ClientError, OSError) as error:
        log.warning("sending a reply failed (%s); it is sent at the next start", error)
        return Sent(Outcome.FAILED)
