"""Getting updates from Telegram with at-least-once delivery, and running them in order.

PTB's own `Updater` confirms an update (by asking for the next offset) as soon as it is fetched,
so a crash loses whatever was still being answered. Here an update is confirmed only after it
was handled: `getUpdates` is called with the lowest update still in flight, Telegram delivers the
unfinished ones again after a restart, and the core's stored turn (keyed by chat and message id)
turns a repeated delivery into a no-op. The webhook answers Telegram only after the update was
handled (or after a time limit), so Telegram retries what a crash interrupted.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Hashable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from aiohttp import web
from telegram import Bot, Update
from telegram.error import InvalidToken, RetryAfter, TelegramError

from bots.telegram_delivery import retry_seconds

log = logging.getLogger(__name__)
ALLOWED_UPDATES = ("message",)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"
Process = Callable[[Update], Awaitable[None]]
T = TypeVar("T")


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

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def submit(self, update: Update) -> asyncio.Task[None]:
        """Start (or, for an update already running, return) the task that handles it."""
        running = self._tasks.get(update.update_id)
        if running is not None:
            return running
        key = ordering_key(update)
        task = asyncio.create_task(self._run(update, self._tails.get(key)))
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
        """Let running updates finish for up to `timeout_s`, then cancel the rest."""
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("cancelled %d unfinished updates (Telegram delivers them again)", len(late))
            await asyncio.wait(late)


class OffsetTracker:
    """Which offset confirms exactly the updates that were handled."""

    def __init__(self) -> None:
        self._pending: set[int] = set()
        self._done: set[int] = set()
        self._highest: int | None = None

    @property
    def busy(self) -> bool:
        return bool(self._pending)

    def offset(self) -> int | None:
        if self._pending:
            return min(self._pending)
        return None if self._highest is None else self._highest + 1

    def is_new(self, update_id: int) -> bool:
        floor = self.offset()
        known = update_id in self._pending or update_id in self._done
        return not known and (floor is None or update_id >= floor)

    def started(self, update_id: int) -> None:
        self._pending.add(update_id)
        self._highest = update_id if self._highest is None else max(self._highest, update_id)

    def finished(self, update_id: int, handled: bool) -> None:
        """`handled` False (cancelled): stays unconfirmed, so Telegram delivers it again."""
        if not handled:
            return
        self._pending.discard(update_id)
        self._done.add(update_id)
        floor = self.offset()
        self._done = {done for done in self._done if floor is None or done >= floor}


@dataclass(frozen=True, slots=True)
class PollingConfig:
    long_poll_s: int = 30
    busy_poll_s: float = 0.5
    error_backoff_s: float = 2.0
    limit: int = 100


class Poller:
    """Long polling that confirms an update only once it has been handled."""

    def __init__(self, bot: Bot, dispatcher: UpdateDispatcher, config: PollingConfig) -> None:
        self._bot = bot
        self._dispatcher = dispatcher
        self._config = config
        self._tracker = OffsetTracker()
        self._progress = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            updates = await until_stopped(self._fetch(), stop)
            self._accept(updates or ())
            if self._tracker.busy:
                self._progress.clear()
                await until_stopped(self._progress.wait(), stop, self._config.busy_poll_s)

    def _accept(self, updates: Sequence[Update]) -> None:
        for update in updates:
            if self._tracker.is_new(update.update_id):
                self._tracker.started(update.update_id)
                task = self._dispatcher.submit(update)
                task.add_done_callback(partial(self._finished, update.update_id))

    def _finished(self, update_id: int, task: asyncio.Task[None]) -> None:
        """Once nothing is in flight, poll at once: to confirm, then to long-poll again."""
        self._tracker.finished(update_id, handled=not task.cancelled())
        if not self._tracker.busy:
            self._progress.set()

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
            offset=self._tracker.offset(),
            timeout=0 if self._tracker.busy else long_poll_s,
            limit=self._config.limit,
            allowed_updates=list(ALLOWED_UPDATES),
        )

    async def confirm(self) -> None:
        """Tell Telegram which updates were handled (call after draining, before shutdown)."""
        if self._tracker.offset() is None:
            return
        with suppress(TelegramError):
            updates = await self._get_updates(0)
            log.debug("confirmed handled updates; %d wait for the next start", len(updates))


async def until_stopped(
    work: Awaitable[T], stop: asyncio.Event, timeout_s: float | None = None
) -> T | None:
    """`work`'s result, or None when `stop` is set (or `timeout_s` passes) first."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not job.done():
            job.cancel()
            with suppress(asyncio.CancelledError):
                await job
    return None if job.cancelled() else job.result()


class WebhookServer:
    """Receives updates from Telegram over HTTP, checking the secret token on every request."""

    def __init__(
        self,
        bot: Bot,
        dispatcher: UpdateDispatcher,
        secret: str,
        path: str = "/",
        reply_timeout_s: float = 50.0,
    ) -> None:
        self._bot = bot
        self._dispatcher = dispatcher
        self._secret = secret.encode("utf-8")
        self._path = path or "/"
        self._reply_timeout_s = reply_timeout_s
        self._runner: web.AppRunner | None = None
        self._closing = False
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_post(self._path, self._receive)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = _bound_port(self._runner)
        return self.port

    async def stop(self, drain_timeout_s: float) -> None:
        """Refuse new deliveries (Telegram retries them later), finish running ones, close."""
        self._closing = True
        await self._dispatcher.drain(drain_timeout_s)
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        if not self._secret_matches(request):
            return web.Response(status=403, text="forbidden")
        if self._closing:
            return web.Response(status=503, text="restarting")
        update = await self._parse(request)
        if update is None:
            return web.Response(status=400, text="not an update")
        task = self._dispatcher.submit(update)
        await asyncio.wait({task}, timeout=self._reply_timeout_s)
        return web.Response(status=200)

    def _secret_matches(self, request: web.Request) -> bool:
        given = request.headers.get(SECRET_HEADER, "").encode("utf-8", errors="replace")
        return hmac.compare_digest(given, self._secret)

    async def _parse(self, request: web.Request) -> Update | None:
        try:
            data: Any = await request.json()
            return Update.de_json(data, self._bot) if isinstance(data, dict) else None
        except Exception as error:
            log.warning("ignored a webhook request that is not an update: %s", type(error).__name__)
            return None


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    raise RuntimeError("the webhook server is not listening")
