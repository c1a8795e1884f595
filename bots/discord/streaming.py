"""Streamed Discord replies (`bots.live`): discord.py's errors as `bots.live` expects them,
a reply that grows by edits, and its finish."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import discord

from bots.discord.rendering import (
    NO_MENTIONS,
    REPLY_MENTION,
    AnyMessage,
    chunks_of,
    outcome_of,
    send_reply,
)
from bots.live import (
    EditFailed,
    FloodWait,
    LiveMessage,
    finish_reply,
)
from bots.outbox import Sent
from core.messages import Reply

log = logging.getLogger(__name__)


@contextlib.contextmanager
def streaming_errors() -> Iterator[None]:
    """discord.py's errors for a streamed message, as `bots.live` expects them."""
    try:
        yield
    except discord.RateLimited as error:
        raise FloodWait(error.retry_after) from None
    except (discord.NotFound, discord.Forbidden) as error:
        raise EditFailed(str(error)) from None
    except discord.HTTPException as error:
        if error.status == 429 or error.status >= 500:
            raise FloodWait(retry_after_of(error)) from None
        raise EditFailed(str(error)) from None
    except (aiohttp.ClientError, OSError) as error:
        log.warning("streamed reply: %s", error)
        raise FloodWait(1.0) from None


def retry_after_of(error: discord.HTTPException) -> float:
    try:
        return float(error.response.headers.get("Retry-After", 1.0))
    except (AttributeError, TypeError, ValueError):
        return 1.0


Posted = Callable[[int], Awaitable[None]]


async def _nothing_to_note(_message_id: int) -> None:
    """The default `on_post`."""


StreamTiming = tuple[float, float | None]  # the interval between edits, the first post's delay


def streamed(
    post: Callable[[str], Awaitable[AnyMessage]],
    mentions: discord.AllowedMentions,
    timing: StreamTiming,
) -> LiveMessage[AnyMessage]:
    """A Discord message that grows by edits (`PATCH`), `post` making it; discord.py's errors
    as `bots.live` expects them; each partial cut to the reply's first chunk."""

    async def posted(text: str) -> AnyMessage:
        with streaming_errors():
            return await post(text)

    async def edit(sent: AnyMessage, text: str) -> None:
        with streaming_errors():
            await sent.edit(content=text, allowed_mentions=mentions)

    interval_s, first_after_s = timing
    return LiveMessage(
        posted,
        edit,
        interval_s=interval_s,
        first_after_s=first_after_s,
        fit=lambda text: chunks_of(Reply(text))[0],
    )


def live_reply(
    message: AnyMessage,
    interval_s: float,
    first_after_s: float | None = None,
    on_post: Posted = _nothing_to_note,
) -> LiveMessage[AnyMessage]:
    """A reply to `message` that grows by edits (the first post may ping its author);
    `on_post` learns the id of the message it streams into."""
    reference = message.to_reference(fail_if_not_exists=False)

    async def post(text: str) -> AnyMessage:
        sent = await message.channel.send(text, reference=reference, allowed_mentions=REPLY_MENTION)
        await on_post(sent.id)
        return sent

    return streamed(post, REPLY_MENTION, (interval_s, first_after_s))


SendMore = Callable[[str], Awaitable[str]]  # sends one more chunk of a reply; the message's id


async def finish_live(
    live: LiveMessage[AnyMessage] | None, reply: Reply, send_more: SendMore
) -> list[str] | None:
    """Finish the streamed message (`bots.live.finish_reply`) and send the rest with
    `send_more`: the ids of every message of the reply; None when it was not streamed."""
    rest = await finish_reply(live, reply, chunks_of(reply))
    if rest is None or live is None or live.handle is None:
        return None
    return [str(live.handle.id), *[await send_more(chunk) for chunk in rest]]


def more_replies_to(message: AnyMessage) -> SendMore:
    """The rest of a streamed reply to a message: further replies to it that ping no one."""
    reference = message.to_reference(fail_if_not_exists=False)

    async def send(chunk: str) -> str:
        posted = await message.channel.send(
            chunk, reference=reference, allowed_mentions=NO_MENTIONS
        )
        return str(posted.id)

    return send


async def deliver(message: AnyMessage, reply: Reply, live: LiveMessage[AnyMessage] | None) -> Sent:
    """Send the reply (finishing the streamed message, if any); how it went."""

    async def sending() -> list[str]:
        streamed_ids = await finish_live(live, reply, more_replies_to(message))
        return streamed_ids or await send_reply(message, reply)

    return await outcome_of(sending())
