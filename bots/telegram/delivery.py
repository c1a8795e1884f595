"""Sending to Telegram: paced per chat (`bots.telegram.pacing`), retried on flood limits and
network errors, classified (sent, refused for good, failed for now); and "typing…".
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial

from telegram import Bot, InputFile, LinkPreviewOptions, Message, ReplyParameters
from telegram.constants import ChatAction
from telegram.error import BadRequest, Forbidden, NetworkError, RetryAfter, TelegramError
from telegram.warnings import PTBDeprecationWarning

from bots.live import EditFailed, FloodWait
from bots.outbox import Outcome, Sent
from bots.telegram.pacing import ChatPacer, Lane
from core.messages import Attachment
from core.ops.logs import UserIds

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a reply goes: the chat, the forum topic, and the message it quotes (groups)."""

    chat_id: int
    is_group: bool = False
    thread_id: int | None = None
    reply_to: int | None = None


def retry_seconds(error: RetryAfter) -> float:
    """`RetryAfter` as seconds (PTB 22 gives an int or a timedelta, depending on PTB_TIMEDELTA)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PTBDeprecationWarning)
        value = error.retry_after
    return value.total_seconds() if isinstance(value, timedelta) else float(value)


Send = Callable[[], Awaitable[object]]


def _message_ids(results: list[object]) -> tuple[str, ...]:
    return tuple(str(r.message_id) for r in results if isinstance(r, Message))


@dataclass(eq=False, slots=True)
class Sender:
    """Sends plain text and documents, paced per chat, retrying flood and network errors.

    Chat ids appear in its log lines as `ids` shows them (keyed hashes by default)."""

    bot: Bot
    pacer: ChatPacer
    attempts: int = 4
    backoff_s: float = 0.5
    ids: UserIds = field(default_factory=UserIds)

    def chat(self, target: Target) -> str:
        """The chat as log lines show it."""
        return self.ids("telegram", str(target.chat_id))

    async def send_chunks(self, target: Target, chunks: list[str]) -> Sent:
        """Send the chunks in order, in one lane turn, stopping at the first that fails."""
        results: list[object] = []
        async with self.pacer.lane(target.chat_id, target.is_group) as lane:
            for chunk in chunks:
                outcome = await self._attempt(lane, target, self._keep(results, target, chunk))
                if outcome is not Outcome.SENT:
                    return Sent(outcome, _message_ids(results))
        return Sent(Outcome.SENT, _message_ids(results))

    def _keep(self, results: list[object], target: Target, text: str) -> Send:
        async def send() -> None:
            results.append(await self._text(target, text))

        return send

    async def send_texts(self, target: Target, chunks: list[str]) -> bool:
        """`send_chunks`, True when every chunk was sent."""
        return (await self.send_chunks(target, chunks)).ok

    async def send_text(self, target: Target, text: str) -> int | None:
        """Send one message like `send_texts`; its message id, or None when it failed."""
        sent = await self.send_chunks(target, [text])
        return int(sent.ids[0]) if sent.ok and sent.ids else None

    async def edit_text(self, target: Target, message_id: int, text: str) -> None:
        """One paced edit of a sent message (a streamed reply). A flood limit or a network error
        raises FloodWait, so the caller retries later with newer text; a message that cannot
        be edited raises EditFailed. Telegram's "message is not modified" counts as done."""
        async with self.pacer.lane(target.chat_id, target.is_group) as lane:
            await self.pacer.wait_turn(lane)
            try:
                await self.bot.edit_message_text(
                    text,
                    chat_id=target.chat_id,
                    message_id=message_id,
                    link_preview_options=LinkPreviewOptions(is_disabled=True),
                )
            except RetryAfter as error:
                raise FloodWait(retry_seconds(error)) from None
            except BadRequest as error:
                if "not modified" not in str(error).lower():
                    raise EditFailed(f"chat {self.chat(target)}: {error}") from None
            except NetworkError as error:
                log.warning("editing in chat %s failed: %s", self.chat(target), error)
                raise FloodWait(self.backoff_s) from None
            except TelegramError as error:
                raise EditFailed(f"chat {self.chat(target)}: {error}") from None

    async def send_document(self, target: Target, attachment: Attachment, caption: str) -> bool:
        async with self.pacer.lane(target.chat_id, target.is_group) as lane:
            send = partial(self._document, target, attachment, caption)
            return await self._attempt(lane, target, send) is Outcome.SENT

    def _text(self, target: Target, text: str) -> Awaitable[object]:
        return self.bot.send_message(
            chat_id=target.chat_id,
            text=text,
            message_thread_id=target.thread_id,
            reply_parameters=_quote(target),
            link_preview_options=LinkPreviewOptions(is_disabled=True),
        )

    def _document(self, target: Target, attachment: Attachment, caption: str) -> Awaitable[object]:
        return self.bot.send_document(
            chat_id=target.chat_id,
            document=InputFile(attachment.data, filename=attachment.filename),
            caption=caption or None,
            message_thread_id=target.thread_id,
            reply_parameters=_quote(target),
        )

    async def _attempt(self, lane: Lane, target: Target, send: Send) -> Outcome:
        for attempt in range(1, self.attempts + 1):
            await self.pacer.wait_turn(lane)
            try:
                await send()
                return Outcome.SENT
            except RetryAfter as error:
                await self._after_flood(target, error, attempt)
            except (BadRequest, Forbidden) as error:
                log.warning("telegram refused a message to chat %s: %s", self.chat(target), error)
                return Outcome.REFUSED
            except NetworkError as error:
                await self._after_network_error(target, error, attempt)
            except TelegramError as error:
                log.warning("sending to chat %s failed: %s", self.chat(target), error)
                return Outcome.FAILED
        log.error("gave up sending to chat %s after %d attempts", self.chat(target), self.attempts)
        return Outcome.FAILED

    async def _after_flood(self, target: Target, error: RetryAfter, attempt: int) -> None:
        seconds = retry_seconds(error)
        log.warning("flood control in chat %s: retrying in %.1fs", self.chat(target), seconds)
        if attempt < self.attempts:
            await asyncio.sleep(seconds)

    async def _after_network_error(
        self, target: Target, error: TelegramError, attempt: int
    ) -> None:
        log.warning("sending to chat %s failed (attempt %d): %s", self.chat(target), attempt, error)
        if attempt < self.attempts:
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))


def _quote(target: Target) -> ReplyParameters | None:
    if target.reply_to is None:
        return None
    return ReplyParameters(message_id=target.reply_to, allow_sending_without_reply=True)


@asynccontextmanager
async def typing(bot: Bot, target: Target, interval_s: float) -> AsyncIterator[None]:
    """Show "typing…" in the chat, refreshed every `interval_s`, for as long as the block runs."""
    task = asyncio.create_task(_keep_typing(bot, target, interval_s))
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def _keep_typing(bot: Bot, target: Target, interval_s: float) -> None:
    while True:
        try:
            await bot.send_chat_action(
                target.chat_id, ChatAction.TYPING, message_thread_id=target.thread_id
            )
        except TelegramError as error:
            log.debug("typing indicator failed: %s", error)
        await asyncio.sleep(interval_s)
