"""Build the storage asked for: SQL (SQLite or PostgreSQL), behind Redis if set; and the
conversation locks (shared through Redis when it is set)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.messages import ConversationKey
from storage.base import Storage, StorageError
from storage.locks import ConversationLocks, InProcessLocks
from storage.redis.cache import RedisCachedStorage
from storage.redis.client import REDIS_ERRORS, RedisLink, describe_redis_error
from storage.redis.keys import RedisKeyBuilder
from storage.redis.locks import RedisLocks
from storage.sql import SqlStorage


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """Where the history lives (KOBOT_DATABASE_URL) and the optional Redis hot window
    (KOBOT_REDIS_URL, KOBOT_REDIS_TTL_S, KOBOT_REDIS_WINDOW_TURNS)."""

    database_url: str
    redis_url: str | None = None
    redis_ttl_s: int = 86400
    redis_window_turns: int = 80


async def build_storage(
    settings: StorageOptions, *, redis_keys: RedisKeyBuilder | None = None
) -> Storage:
    """Open (and migrate) the database, then check Redis; any failure names the variable.

    `redis_keys` changes the Redis key prefix (several deployments sharing one Redis, tests).
    """
    try:
        sql = await SqlStorage.create(settings.database_url)
    except StorageError as error:
        raise StorageError(f"KOBOT_DATABASE_URL: {error}") from error
    if not settings.redis_url:
        return sql
    try:
        return await _with_redis(sql, settings, redis_keys)
    except BaseException:
        await sql.close()
        raise


async def _with_redis(
    sql: SqlStorage, settings: StorageOptions, keys: RedisKeyBuilder | None
) -> RedisCachedStorage:
    assert settings.redis_url is not None
    link = RedisLink.open(settings.redis_url, keys)
    try:
        await link.client.ping()
    except REDIS_ERRORS as error:
        await link.close()
        where, reason = link.where, describe_redis_error(error)
        raise StorageError(f"KOBOT_REDIS_URL: cannot connect to {where} ({reason})") from error
    return RedisCachedStorage(
        sql, link, ttl_s=settings.redis_ttl_s, window_turns=settings.redis_window_turns
    )


@dataclass(frozen=True, slots=True)
class LockOptions:
    """How turns of one conversation are serialized (KOBOT_REDIS_URL, KOBOT_LOCK_LEASE_S,
    KOBOT_LOCK_TIMEOUT_S)."""

    redis_url: str | None = None
    lease_s: float = 15.0
    wait_s: float = 300.0


def build_locks(
    options: LockOptions,
    *,
    redis_keys: RedisKeyBuilder | None = None,
    describe_key: Callable[[ConversationKey], str] | None = None,
) -> ConversationLocks:
    """Redis locks when `redis_url` is set (several workers), otherwise in-process locks.

    `describe_key` shows a conversation in log lines (hashed ids, as the logs' policy says).
    """
    if options.redis_url:
        return RedisLocks(
            RedisLink.open(options.redis_url, redis_keys),
            lease_s=options.lease_s,
            wait_s=options.wait_s,
            describe_key=describe_key,
        )
    return InProcessLocks(options.wait_s)
