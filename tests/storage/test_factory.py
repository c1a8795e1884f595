"""build_storage: the backend the settings ask for, and start-up failures that name the variable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core.messages import ConversationKey
from core.settings import Settings
from storage.base import StorageError
from storage.factory import StorageOptions, build_storage
from storage.redis.cache import RedisCachedStorage
from storage.redis.keys import RedisKeyBuilder
from storage.sql import SqlStorage
from tests.support.services import REDIS_URL, closed_port
from tests.support.storage import sqlite_url, texts, user

KEY = ConversationKey("telegram", "c1", "u1")


def options(**values: Any) -> StorageOptions:
    return StorageOptions(**values)


async def test_sqlite_by_default_settings(tmp_path: Path) -> None:
    storage = await build_storage(options(database_url=sqlite_url(tmp_path)))
    assert isinstance(storage, SqlStorage)
    await storage.append(KEY, [user("hi")])
    assert texts(await storage.recent(KEY, 5)) == ["hi"]
    await storage.close()


async def test_redis_url_puts_the_cache_in_front(tmp_path: Path, redis_prefix: str) -> None:
    chosen = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=sqlite_url(tmp_path), redis_url=REDIS_URL, redis_window_turns=2
    ).storage_options()
    storage = await build_storage(chosen, redis_keys=RedisKeyBuilder(redis_prefix))
    assert isinstance(storage, RedisCachedStorage) and isinstance(storage.inner, SqlStorage)
    await storage.append(KEY, [user("one"), user("two"), user("three")])
    assert texts(await storage.recent(KEY, 5)) == ["one", "two", "three"]
    await storage.close()


async def test_unreachable_postgresql_names_the_variable() -> None:
    url = f"postgresql+asyncpg://kobot:s3cret@127.0.0.1:{closed_port()}/kobot"

    with pytest.raises(StorageError) as caught:
        await build_storage(options(database_url=url))

    message = str(caught.value)
    assert message.startswith("KOBOT_DATABASE_URL: cannot connect to PostgreSQL at 127.0.0.1:")
    assert "/kobot (ConnectionRefusedError" in message and "s3cret" not in message


async def test_unreachable_redis_names_the_variable(tmp_path: Path) -> None:
    url = f"redis://:s3cret@127.0.0.1:{closed_port()}/0"

    with pytest.raises(StorageError) as caught:
        await build_storage(options(database_url=sqlite_url(tmp_path), redis_url=url))

    message = str(caught.value)
    assert message.startswith("KOBOT_REDIS_URL: cannot connect to Redis at 127.0.0.1:")
    assert "s3cret" not in message
