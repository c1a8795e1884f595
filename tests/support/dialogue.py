"""Building a real DialogueManager (SQLite, tiny model) for tests, and the messages it handles."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from bots.app import build_dialogue_manager
from core.dialogue.manager import DialogueManager
from core.messages import IncomingMessage
from core.settings import Settings
from tests.support.backends import RecordingBackend

ManagerFactory = Callable[..., Any]
"""The `make_manager` fixture (tests/core/conftest.py): `await make_manager(**settings)`."""


def make_settings(model_dir: Path, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model": str(model_dir),
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'kobot.db'}",
        "max_new_tokens": 8,
        "temperature": 0.0,
        "device": "cpu",
        "rate_limit_per_minute": 0,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def make_manager(settings: Settings) -> tuple[DialogueManager, RecordingBackend]:
    from core.generation.factory import build_backend

    backend = RecordingBackend(build_backend(settings))
    return await build_dialogue_manager(settings, backend), backend


@asynccontextmanager
async def managed(
    model_dir: Path, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[DialogueManager, RecordingBackend]]:
    """`make_manager` on `make_settings(model_dir, tmp_path, **overrides)`, closed afterwards."""
    manager, backend = await make_manager(make_settings(model_dir, tmp_path, **overrides))
    try:
        yield manager, backend
    finally:
        await manager.close()


def message(text: str, user: str = "u1", chat: str = "c1", **fields: Any) -> IncomingMessage:
    return IncomingMessage(platform="test", user_id=user, chat_id=chat, text=text, **fields)
