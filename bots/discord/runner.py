"""`kobot discord`: log in (the token is checked before the model loads), then run the adapter
(`bots.base.run_adapter`)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import discord
from discord.http import Route

from bots.base import run_adapter, run_platform
from bots.discord.adapter import DEFER_AFTER_S, DiscordAdapter, Timing
from bots.discord.client import (
    IDENTIFY_DELAY_S,
    MISSING_INTENT,
    TOKEN_REJECTED,
    create_client,
    has_message_content,
)
from bots.discord.endpoints import discord_endpoints
from bots.discord.routing import PLATFORM
from bots.live import (
    DEFAULT_INTERVAL_S,
)
from core.dialogue.manager import DialogueManager
from core.errors import StartupError
from core.ops.lifecycle import Shutdown
from core.settings import Settings
from storage.base import mask_url_password


class DiscordBot:
    """The Discord platform: the token is accepted (a login) before the model loads, so a bad
    token fails in a second; then the adapter runs over the manager.

    `run()` serves one given `manager` (the caller closes it; without one it is built after
    the login) until `close()`; `kobot discord` runs it through `bots.base.run_adapter`.
    """

    name = PLATFORM

    def __init__(
        self,
        settings: Settings,
        manager: DialogueManager | None = None,
        *,
        defer_after_s: float = DEFER_AFTER_S,
        identify_delay_s: float = IDENTIFY_DELAY_S,
        stream_interval_s: float = DEFAULT_INTERVAL_S,
        stream_first_after_s: float | None = None,
        **client_options: Any,
    ) -> None:
        self.settings = settings
        self.manager = manager
        self.timing = Timing(defer_after_s, stream_interval_s, stream_first_after_s)
        self.client = create_client(settings, **client_options)
        self.client.identify_delay_s = identify_delay_s
        self.adapter: DiscordAdapter | None = None
        self._held = contextlib.AsyncExitStack()
        self._stop = asyncio.Event()

    async def run(self) -> None:
        """Serve until `close()`; a bad token, intent or gateway setting raises StartupError."""
        await run_platform(self.settings, self, Shutdown(self._stop), 0.0, manager=self.manager)

    async def close(self) -> None:
        """End `run()` now (replies in flight are cancelled)."""
        self._stop.set()

    async def connect(self) -> None:
        token = discord_token(self.settings)
        endpoints = discord_endpoints(
            self.settings.discord_api_url, self.settings.discord_gateway_url
        )
        self._held.enter_context(endpoints)
        await self._held.enter_async_context(self.client)
        await self._login(token)

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> DiscordAdapter:
        self.adapter = DiscordAdapter(
            self.settings,
            manager,
            self.client,
            self.timing,
        )
        return self.adapter

    async def disconnect(self) -> None:
        """Close the client and give discord.py its own endpoints back."""
        await self._held.aclose()

    async def _login(self, token: str) -> None:
        try:
            await self.client.login(token)
        except discord.LoginFailure:
            raise StartupError(TOKEN_REJECTED) from None
        except (aiohttp.ClientError, OSError) as error:
            where = mask_url_password(Route.BASE)
            raise StartupError(f"Discord API에 연결할 수 없어요 ({where}): {error}") from None
        if not has_message_content(self.client.application_flags):
            raise StartupError(MISSING_INTENT)


def discord_token(settings: Settings) -> str:
    token = settings.discord_token.get_secret_value().strip() if settings.discord_token else ""
    if not token:
        raise StartupError("KOBOT_DISCORD_TOKEN: not set (Developer Portal → Bot → Reset Token)")
    return token


def main(settings: Settings) -> int:
    """`kobot discord`: SIGTERM/SIGINT lets the replies in flight finish within
    KOBOT_SHUTDOWN_TIMEOUT_S, then the client closes, then the model and storage."""
    asyncio.run(run_adapter(settings, DiscordBot(settings)))
    return 0
