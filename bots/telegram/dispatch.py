"""Running Telegram updates: concurrently across conversations, in arrival order within one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

from telegram import Update

from bots.base import InFlight

log = logging.getLogger(__name__)
Process = Callable[[Update], Awaitable[None]]


def ordering_key(update: Update) -> Hashable:
    """Updates with the same key run one after another: one person in one chat."""
    chat, user = update.effective_chat, update.effective_user
    if chat is None:
        return ("update", update.update_id)
    return (chat.id, user.id if user is not None else None)


class UpdateDispatcher:
    """Runs updates concurrently across keys and in arrival order within a key."""

    def __init__(self, process: Process, max_concurrent: int) -> None:
        self._process = process
        self._limit = asyncio.Semaphore(max_concurrent)
        self._tails: dict[Hashable, asyncio.Task[None]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._running = InFlight()

    @property
    def in_flight(self) -> int:
        return self._running.count

    def is_running(self, update_id: int) -> bool:
        """Whether this update was submitted and is not finished yet."""
        return update_id in self._tasks

    def submit(self, update: Update) -> asyncio.Task[None]:
        """Start (or, for an update already running, return) the task that handles it."""
        running = self._tasks.get(update.update_id)
        if running is not None:
            return running
        key = ordering_key(update)
        task = self._running.spawn(self._run(update, self._tails.get(key)))
        self._tails[key] = self._tasks[update.update_id] = task
        task.add_done_callback(lambda done: self._forget(key, update.update_id, done))
        return task

    async def _run(self, update: Update, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])
        async with self._limit:
            try:
                await self._process(update)
            except Exception:
                log.exception("update %d failed", update.update_id)

    def _forget(self, key: Hashable, update_id: int, task: asyncio.Task[None]) -> None:
        self._tasks.pop(update_id, None)
        if self._tails.get(key) is task:
            del self._tails[key]

    async def drain(self, timeout_s: float) -> None:
        """Let running updates finish for up to `timeout_s`, then cancel the rest (they stay
        unfinished in the inbox: taken again at the next start)."""
        await self._running.drain(timeout_s)
