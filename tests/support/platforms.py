"""Settings that point a bot at the fake platforms (tests/support/telegram.py, discord.py): the
tiny model on the CPU, SQLite in the test's folder, short replies, nothing read from the
environment; `overrides` are Settings fields."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.settings import Settings
from tests.support.discord import FakeDiscord
from tests.support.telegram import TOKEN, FakeTelegram


def bot_settings(tmp_path: Path, model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "device": "cpu",
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kobot.db'}",
        "max_new_tokens": 8,
    }
    return Settings(_env_file=None, **values | overrides)  # type: ignore[call-arg]


def telegram_settings(
    fake: FakeTelegram, tmp_path: Path, model_dir: Path, **overrides: Any
) -> Settings:
    platform = {"telegram_token": TOKEN, "telegram_base_url": fake.base_url}
    return bot_settings(tmp_path, model_dir, **platform | overrides)


def discord_settings(
    fake: FakeDiscord, tmp_path: Path, model_dir: Path, **overrides: Any
) -> Settings:
    platform = {
        "rate_limit_per_minute": 0,
        "discord_token": fake.token,
        "discord_api_url": fake.api_url,
        "discord_gateway_url": fake.gateway_url,
        "discord_channels": [fake.guild.listed_id],
        "stream_replies": False,  # streamed replies: tests/e2e/test_streaming_discord.py
    }
    return bot_settings(tmp_path, model_dir, **platform | overrides)
