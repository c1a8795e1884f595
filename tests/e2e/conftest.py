"""Fixtures for the end-to-end tests: the tiny model once per session (the engine, as the
factory ships it) and the fake platforms, each started for one test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core.generation.base import GenerationBackend
from tests.support.backends import close_now, engine_backend
from tests.support.discord import FakeDiscord
from tests.support.telegram import FakeTelegram


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir: Path) -> Iterator[GenerationBackend]:
    """What the factory ships for KOBOT_BACKEND=local (the engine), on the tiny model; wrap it
    (tests/support/backends.py) so that a bot's `close` leaves it open."""
    backend = engine_backend(tiny_model_dir)
    yield backend
    close_now(backend)


@pytest.fixture
async def fake_telegram() -> AsyncIterator[FakeTelegram]:
    server = await FakeTelegram().start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord() as server:
        yield server
