"""Getting updates from Telegram without losing one, and running them in order.

PTB's own `Updater` confirms an update (by asking for the next offset) as soon as it is fetched,
so a crash loses whatever was still being answered. Confirming only after handling is no better:
the offset then waits for the slowest conversation, and Telegram returns at most 100 updates
from there, so one stuck chat blocks every other. Here each fetched batch is first written to the
storage inbox (one transaction, idempotent), then confirmed at once by the next `getUpdates`;
workers take updates in order per conversation and mark each finished after its reply was sent
(the core's outbox keeps the reply's delivery state). At start-up the unfinished ones are taken
again. The webhook (`bots.telegram.webhook`) answers Telegram as soon as the update is stored.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

from telegram import Bot, Update
from telegram.error import InvalidToken, RetryAfter, TelegramError

from bots.base import until_stopped
from bots.telegram.delivery import retry_seconds
from bots.telegram.dispatch import Process, UpdateDispatcher, ordering_key
from bots.telegram.routing import PLATFORM
from storage.base import InboxItem, Storage, StorageError

log = logging.getLogger(__name__)
ALLOWED_UPDATES = ("message",)


class DeliveryPending(Exception):
    """The reply could not be sent for now (network trouble, flood limits past the retries):
    the update stays unfinished in the inbox and is handled again at the next start."""


class UpdateInbox:
    """Telegram updates in the storage inbox: stored before they are confirmed, finished once
    handled. `process` is what handles one update; it raises `DeliveryPending` to keep it."""

    def __init__(self, storage: Storage, bot: Bot, process: Process) -> None:
        self._storage = storage
        self._bot = bot
        self._process = process
        self._streamed: dict[int, int] = {}  # update id -> the message a dead run streamed into

    async def store(self, updates: Sequence[Update]) -> list[Update]:
        """Store the batch (raising StorageError); the updates not seen before, in order."""
        items = [_inbox_item(update) for update in updates]
        new = {item.item_id for item in await self._storage.inbox_add(items)}
        return [update for update in updates if str(update.update_id) in new]

    async def unfinished(self) -> list[Update]:
        """What a previous run stored but did not finish, in arrival order."""
        items = await self._storage.inbox_pending(PLATFORM)
        for item in items:
            if item.note.isdigit():
                self._streamed[int(item.item_id)] = int(item.note)
        return [Update.de_json(json.loads(item.payload), self._bot) for item in items]

    def streamed_before(self, update_id: int) -> int | None:
        """The message a previous run began streaming this update's reply into, if any."""
        return self._streamed.pop(update_id, None)

    async def note_streamed(self, update_id: int, message_id: int) -> None:
        """Remember the message a reply is being streamed into, so that a restart finishes
        that message instead of leaving it half-written beside a new one."""
        try:
            await self._storage.inbox_note(PLATFORM, str(update_id), str(message_id))
        except StorageError as error:
            log.warning("could not note a streamed message: %s", error)

    async def process(self, update: Update) -> None:
        """Handle one update, then mark it finished (unless its reply is still pending)."""
        try:
            await self._process(update)
        except DeliveryPending:
            log.warning("update %d: its reply is kept for the next start", update.update_id)
            return
        except Exception:
            log.exception("update %d failed", update.update_id)
        await self._finish(update.update_id)

    async def _finish(self, update_id: int) -> None:
        try:
            await self._storage.inbox_done(PLATFORM, str(update_id))
        except StorageError as error:
            log.warning("could not mark update %d finished: %s", update_id, error)


def _inbox_item(update: Update) -> InboxItem:
    lane = ordering_key(update)
    return InboxItem(PLATFORM, str(update.update_id), str(lane), json.dumps(update.to_dict()))


async def resume_unfinished(inbox: UpdateInbox, dispatcher: UpdateDispatcher) -> int:
    """Take again what a previous run stored but did not finish; how many."""
    updates = await inbox.unfinished()
    for update in updates:
        dispatcher.submit(update)
    if updates:
        log.info("taking up %d unfinished updates from the inbox", len(updates))
    return len(updates)


@dataclass(frozen=True, slots=True)
class PollingConfig:
    long_poll_s: int = 30
    error_backoff_s: float = 2.0
    limit: int = 100


class Poller:
    """Long polling that stores each batch in the inbox, then confirms it with the next call."""

    def __init__(
        self,
        bot: Bot,
        dispatcher: UpdateDispatcher,
        inbox: UpdateInbox,
        config: PollingConfig,
    ) -> None:
        self._bot = bot
        self._dispatcher = dispatcher
        self._inbox = inbox
        self._config = config
        self._offset: int | None = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            updates = await until_stopped(self._fetch(), stop)
            if updates:
                await self._accept(updates)

    async def _accept(self, updates: Sequence[Update]) -> None:
        """Store, then move the offset past the batch (the next call confirms it) and start
        the new ones; a batch that cannot be stored is not confirmed (fetched again)."""
        try:
            new = await self._inbox.store(updates)
        except StorageError as error:
            log.warning(
                "not confirming %d updates, they could not be stored: %s", len(updates), error
            )
            await asyncio.sleep(self._config.error_backoff_s)
            return
        self._offset = max(update.update_id for update in updates) + 1
        for update in new:
            self._dispatcher.submit(update)

    async def _fetch(self) -> Sequence[Update]:
        try:
            return await self._get_updates(self._config.long_poll_s)
        except RetryAfter as error:
            await asyncio.sleep(retry_seconds(error))
        except InvalidToken:
            raise
        except TelegramError as error:
            log.warning("getUpdates failed: %s", error)
            await asyncio.sleep(self._config.error_backoff_s)
        return ()

    async def _get_updates(self, long_poll_s: int) -> Sequence[Update]:
        return await self._bot.get_updates(
            offset=self._offset,
            timeout=long_poll_s,
            limit=self._config.limit,
            allowed_updates=list(ALLOWED_UPDATES),
        )

    async def confirm(self) -> None:
        """Tell Telegram the stored updates arrived (call before shutdown)."""
        if self._offset is None:
            return
        with suppress(TelegramError):
            updates = await self._get_updates(0)
            log.debug("confirmed stored updates; %d wait for the next start", len(updates))
