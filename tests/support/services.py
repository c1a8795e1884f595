"""The PostgreSQL and Redis test servers, shared with other test processes running in parallel.

Each user gets its own PostgreSQL schema (dropped afterwards) and its own Redis key prefix (its
keys deleted afterwards); nothing here ever flushes a whole Redis. A server that does not answer
makes the test skip, naming the server, unless `REQUIRE_TEST_SERVICES=1` (CI): then it fails.

Use from any test folder:

    from tests.support.services import pg_schema, redis_prefix  # noqa: F401  (fixtures)

    async def test_x(pg_schema: PostgresSchema, redis_prefix: str) -> None:
        storage = await SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args)

or the context managers `postgres_schema()` / `redis_key_prefix()` directly.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import asyncpg
import pytest
from redis.asyncio import Redis

from storage.base import mask_url_password

POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_VARIABLE = "REQUIRE_TEST_SERVICES"
CHECK_TIMEOUT_S = 3.0

_problems: dict[str, str | None] = {}  # server -> why it does not answer (checked once)


def services_required() -> bool:
    return os.environ.get(REQUIRE_VARIABLE, "") == "1"


def unavailable(server: str, url: str, problem: str) -> NoReturn:
    message = f"{server} at {mask_url_password(url)} does not answer: {problem}"
    if services_required():
        pytest.fail(f"{message} ({REQUIRE_VARIABLE}=1)")
    pytest.skip(f"{message} (set {REQUIRE_VARIABLE}=1 to fail instead)")


def asyncpg_dsn(url: str = POSTGRES_URL) -> str:
    """The SQLAlchemy URL in the plain form asyncpg itself accepts."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _postgres_problem() -> str | None:
    try:
        connection = await asyncpg.connect(asyncpg_dsn(), timeout=CHECK_TIMEOUT_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
        return f"{type(error).__name__}: {error}"
    await connection.close()
    return None


async def _redis_problem() -> str | None:
    client = Redis.from_url(REDIS_URL, socket_connect_timeout=CHECK_TIMEOUT_S)
    try:
        await client.ping()
    except Exception as error:  # any failure means "not usable"
        return f"{type(error).__name__}: {error}"
    finally:
        await client.aclose()
    return None


async def require_postgres() -> None:
    if "postgres" not in _problems:
        _problems["postgres"] = await _postgres_problem()
    if problem := _problems["postgres"]:
        unavailable("PostgreSQL", POSTGRES_URL, problem)


async def require_redis() -> None:
    if "redis" not in _problems:
        _problems["redis"] = await _redis_problem()
    if problem := _problems["redis"]:
        unavailable("Redis", REDIS_URL, problem)


@dataclass(frozen=True, slots=True)
class PostgresSchema:
    """A private schema: pass `connect_args` to the engine so its search_path points there."""

    url: str
    name: str

    @property
    def connect_args(self) -> dict[str, Any]:
        return {"server_settings": {"search_path": self.name}}


@asynccontextmanager
async def postgres_schema() -> AsyncIterator[PostgresSchema]:
    """A fresh, empty schema in the test database, dropped (with everything in it) afterwards."""
    await require_postgres()
    name = f"test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(asyncpg_dsn(), timeout=CHECK_TIMEOUT_S)
    try:
        await admin.execute(f'CREATE SCHEMA "{name}"')
        yield PostgresSchema(POSTGRES_URL, name)
    finally:
        await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        await admin.close()


async def delete_redis_keys(prefix: str, url: str = REDIS_URL) -> int:
    """Delete every key under `prefix:` (never FLUSHALL: the server is shared)."""
    client = Redis.from_url(url)
    try:
        names = [name async for name in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if names:
            await client.delete(*names)
        return len(names)
    finally:
        await client.aclose()


@asynccontextmanager
async def redis_key_prefix() -> AsyncIterator[str]:
    """A unique key prefix; its keys are deleted afterwards."""
    await require_redis()
    prefix = f"test-{uuid.uuid4().hex[:16]}"
    try:
        yield prefix
    finally:
        await delete_redis_keys(prefix)


def closed_port() -> int:
    """A local TCP port nothing listens on (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
async def pg_schema() -> AsyncIterator[PostgresSchema]:
    async with postgres_schema() as schema:
        yield schema


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    async with redis_key_prefix() as prefix:
        yield prefix
