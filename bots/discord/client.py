"""The discord.py client: intents, one gateway connection or shards, gateway events handed
to the adapter, and what a refused token or a closed gateway means."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import discord

from bots.base import InFlight
from bots.discord.rendering import NO_MENTIONS
from core.settings import Settings

IDENTIFY_DELAY_S = 5.0  # Discord's default: one IDENTIFY per 5 s per bucket


MISSING_INTENT = (
    "Discord 봇에 Message Content Intent가 켜져 있지 않아요. Developer Portal → Bot → "
    "Privileged Gateway Intents에서 켜 주세요. (The message content intent is not enabled.)"
)
TOKEN_REJECTED = (
    "Discord가 KOBOT_DISCORD_TOKEN을 거부했어요 (401). Developer Portal → Bot에서 토큰을 다시 "
    "확인해 주세요. (Discord rejected the bot token.)"
)
GATEWAY_CLOSE_REASONS = {
    4004: TOKEN_REJECTED,
    4010: "invalid shard: check KOBOT_DISCORD_SHARDS",
    4011: "Discord requires sharding: set KOBOT_DISCORD_SHARDS=auto",
    4012: "invalid gateway API version: check KOBOT_DISCORD_GATEWAY_URL",
    4013: "invalid intents were sent to the gateway",
    4014: MISSING_INTENT,
}


def bot_intents() -> discord.Intents:
    """Guilds (channel and thread cache), guild and DM messages, and their content."""
    intents = discord.Intents.none()
    intents.guilds = True
    intents.guild_messages = True
    intents.dm_messages = True
    intents.message_content = True
    return intents


def has_message_content(flags: discord.ApplicationFlags) -> bool:
    return flags.gateway_message_content or flags.gateway_message_content_limited


class EventSink(Protocol):
    """What the client hands its gateway events to (the adapter)."""

    closing: bool
    in_flight: InFlight

    async def on_message(self, message: discord.Message) -> None: ...

    async def resume_unfinished(self) -> None: ...


class _KobotEvents:
    """Gateway events forwarded to the adapter once it is attached (after login)."""

    adapter: EventSink | None = None
    identify_delay_s: float = IDENTIFY_DELAY_S

    async def on_message(self, message: discord.Message) -> None:
        adapter = self.adapter
        if adapter is not None and not adapter.closing:
            with adapter.in_flight.track():
                await adapter.on_message(message)

    async def on_ready(self) -> None:
        adapter = self.adapter
        if adapter is not None and not adapter.closing:
            with adapter.in_flight.track():
                await adapter.resume_unfinished()

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        if not initial:
            await asyncio.sleep(self.identify_delay_s)


class KobotClient(_KobotEvents, discord.Client):
    """One gateway connection."""


class KobotShardedClient(_KobotEvents, discord.AutoShardedClient):
    """`KOBOT_DISCORD_SHARDS` is `auto` or more than 1."""


def create_client(settings: Settings, **options: Any) -> KobotClient | KobotShardedClient:
    """The client for `KOBOT_DISCORD_SHARDS`; `options` go to discord.py (tests lower timeouts)."""
    options.setdefault("allowed_mentions", NO_MENTIONS)
    shards = settings.discord_shards
    if shards == "1":
        return KobotClient(intents=bot_intents(), **options)
    count = None if shards == "auto" else int(shards)
    return KobotShardedClient(intents=bot_intents(), shard_count=count, **options)
