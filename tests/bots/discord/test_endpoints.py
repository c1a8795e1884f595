"""`KOBOT_DISCORD_API_URL` / `KOBOT_DISCORD_GATEWAY_URL` as discord.py's endpoints."""

from __future__ import annotations

import pytest
from discord.gateway import DiscordWebSocket
from discord.http import Route

from bots.discord.endpoints import api_base, discord_endpoints, gateway_base
from core.errors import StartupError


def test_the_api_version_is_added_unless_the_url_names_one() -> None:
    assert api_base("http://proxy:8080/").endswith("proxy:8080/api/v10")
    assert api_base("https://proxy/api/v9") == "https://proxy/api/v9"


def test_a_url_without_a_scheme_is_refused_with_its_password_masked() -> None:
    with pytest.raises(StartupError) as caught:
        api_base("ftp://user:secret@proxy:8080")
    assert "KOBOT_DISCORD_API_URL" in str(caught.value) and "secret" not in str(caught.value)
    with pytest.raises(StartupError, match="ws:// or wss://"):
        gateway_base("http://not-a-gateway")


def test_the_endpoints_are_restored_after_the_block() -> None:
    saved = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    with discord_endpoints("http://proxy", "ws://gateway"):
        assert Route.BASE == "http://proxy/api/v10"
        assert str(DiscordWebSocket.DEFAULT_GATEWAY) == "ws://gateway"
    assert saved == (Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY)
