"""The webhook: Telegram posts updates to us; each is stored in the inbox before it is answered
200 (`bots.telegram.updates`), then handled."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web
from telegram import Bot, Update

from bots.telegram.dispatch import UpdateDispatcher
from bots.telegram.updates import UpdateInbox
from storage.base import StorageError

log = logging.getLogger(__name__)
SECRET_HEADER = "X-Telegram-Bot-Api-Secret-Token"


class WebhookServer:
    """Receives updates from Telegram over HTTP, checking the secret token on every request;
    answers 200 once the update is in the inbox (500 when it could not be stored: Telegram
    retries), and handles it after that."""

    def __init__(
        self,
        bot: Bot,
        dispatcher: UpdateDispatcher,
        inbox: UpdateInbox,
        secret: str,
        path: str = "/",
    ) -> None:
        self._bot = bot
        self._dispatcher = dispatcher
        self._inbox = inbox
        self._secret = secret.encode("utf-8")
        self._path = path or "/"
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
        try:
            new = await self._inbox.store([update])
        except StorageError as error:
            log.warning("update %d not stored (Telegram retries it): %s", update.update_id, error)
            return web.Response(status=500, text="not stored")
        for stored in new:
            self._dispatcher.submit(stored)
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
