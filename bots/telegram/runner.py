"""`kobot telegram`: the token is checked with `getMe` before the model loads, then the adapter
runs (`bots.base.run_adapter`)."""

from __future__ import annotations

import asyncio

from bots.base import run_adapter
from bots.telegram.adapter import TelegramAdapter, TelegramOptions
from bots.telegram.client import TelegramApp, build_application, connect
from bots.telegram.redaction import SecretRedactor, telegram_secrets
from bots.telegram.routing import PLATFORM
from core.dialogue.manager import DialogueManager
from core.ops.lifecycle import Shutdown
from core.settings import Settings


class TelegramPlatform:
    """The token is checked with `getMe` before the model loads; the bot token and the webhook
    secret are kept out of every log line while the bot runs (`bots.telegram.redaction`)."""

    name = PLATFORM

    def __init__(self, settings: Settings, options: TelegramOptions | None = None) -> None:
        self.settings = settings
        self.options = options or TelegramOptions(drain_timeout_s=settings.shutdown_timeout_s)
        self.redactor = SecretRedactor(telegram_secrets(settings))
        self.application: TelegramApp | None = None

    async def connect(self) -> None:
        self.redactor.install()
        self.application = build_application(self.settings)
        await connect(self.application, self.settings)

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> TelegramAdapter:
        return TelegramAdapter(manager, self.settings, self.application, self.options)

    async def disconnect(self) -> None:
        try:
            if self.application is not None:
                await self.application.shutdown()
        finally:
            self.redactor.remove()


async def run_telegram(
    settings: Settings, options: TelegramOptions | None = None, stop: asyncio.Event | None = None
) -> int:
    """`kobot telegram` (see `bots.base.run_adapter`): SIGTERM/SIGINT (or `stop`) lets the
    running updates finish within KOBOT_SHUTDOWN_TIMEOUT_S, then the model and storage close."""
    await run_adapter(settings, TelegramPlatform(settings, options), stop)
    return 0


def main(settings: Settings) -> int:
    """`kobot telegram`: returns the exit status; start-up failures raise StartupError."""
    return asyncio.run(run_telegram(settings))
