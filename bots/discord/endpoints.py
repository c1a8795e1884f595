"""Pointing discord.py at a REST and/or gateway proxy (`KOBOT_DISCORD_API_URL`,
`KOBOT_DISCORD_GATEWAY_URL`).

discord.py 2.x has no per-client option for either. REST URLs are built from
`discord.http.Route.BASE` (discord.py's own `_set_api_version` sets it; interaction callbacks
and webhook follow-ups use the same `Route`), and the gateway is
`DiscordWebSocket.DEFAULT_GATEWAY` (used for the first IDENTIFY and after an invalidated
session; a plain `Client` never calls `GET /gateway`). `discord_endpoints` sets both for the
lifetime of one bot run and restores them afterwards, so one bot runs per process.
Resumes go to the `resume_gateway_url` the gateway (or the proxy) sends in READY. With
`KOBOT_DISCORD_SHARDS=auto` the shard count is read from `GET /gateway/bot` (through the REST
proxy) but the connection still goes to `DEFAULT_GATEWAY`, so a gateway proxy is honoured.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import yarl
from discord.gateway import DiscordWebSocket
from discord.http import INTERNAL_API_VERSION, Route

from core.errors import StartupError
from storage.base import mask_url_password


def api_base(url: str) -> str:
    """`KOBOT_DISCORD_API_URL` as a `Route.BASE`: `/api/v10` is appended unless a version is."""
    trimmed = url.strip().rstrip("/")
    if not trimmed.startswith(("http://", "https://")):
        shown = mask_url_password(url)
        raise StartupError(
            f"KOBOT_DISCORD_API_URL: must start with http:// or https:// ({shown!r})"
        )
    if re.search(r"/api/v\d+$", trimmed):
        return trimmed
    return f"{trimmed}/api/v{INTERNAL_API_VERSION}"


def gateway_base(url: str) -> yarl.URL:
    trimmed = url.strip()
    if not trimmed.startswith(("ws://", "wss://")):
        shown = mask_url_password(url)
        raise StartupError(
            f"KOBOT_DISCORD_GATEWAY_URL: must start with ws:// or wss:// ({shown!r})"
        )
    return yarl.URL(trimmed)


@contextlib.contextmanager
def discord_endpoints(api_url: str | None, gateway_url: str | None) -> Iterator[None]:
    """Point discord.py at a REST and/or gateway proxy while the block runs (see module doc)."""
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    try:
        if api_url:
            Route.BASE = api_base(api_url)
        if gateway_url:
            DiscordWebSocket.DEFAULT_GATEWAY = gateway_base(gateway_url)
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved
