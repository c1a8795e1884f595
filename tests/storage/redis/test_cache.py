"""The Redis write-through cache: served from Redis when it can prove it, SQL otherwise.

A real FLUSHALL would wipe the keys of tests running in parallel on the shared server, so the
flush is simulated by deleting every key of this test's own prefix: to the cache under test
that is exactly what a FLUSHALL looks like.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from redis.asyncio import Redis

from core.messages import ConversationKey
from storage.base import Account
from storage.redis.cache import RedisCachedStorage, proves_recent
from storage.redis.client import RedisLink, redis_client
from storage.redis.keys import RedisKeyBuilder
from storage.sql import SqlStorage
from tests.support.services import REDIS_URL, PostgresSchema, closed_port, delete_redis_keys
from tests.support.storage import SpyStorage, TcpProxy, ai, texts, user

KEY = ConversationKey("telegram", "c1", "u1")
WINDOW = 6
TTL_S = 600


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[Redis]:
    client = redis_client(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture
async def spy(pg_schema: PostgresSchema) -> AsyncIterator[SpyStorage]:
    sql = await SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args)
    yield SpyStorage(sql)
    await sql.close()


def make_cache(inner: SpyStorage | SqlStorage, client: Redis, prefix: str) -> RedisCachedStorage:
    return RedisCachedStorage(
        inner,
        RedisLink(client, RedisKeyBuilder(prefix)),
        ttl_s=TTL_S,
        window_turns=WINDOW,
        retry_after_s=0.0,
    )


@pytest.fixture
def cache(spy: SpyStorage, redis: Redis, redis_prefix: str) -> RedisCachedStorage:
    return make_cache(spy, redis, redis_prefix)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """A port forwarded to the test Redis: `stop()` is an outage, `start()` heals it."""
    proxy = TcpProxy("127.0.0.1", 6379)
    await proxy.start()
    yield proxy
    await proxy.stop()


def cache_through(
    proxy: TcpProxy, spy: SpyStorage, prefix: str, **options: Any
) -> RedisCachedStorage:
    """A cache whose own client reaches Redis through `proxy`."""
    link = RedisLink.open(f"redis://127.0.0.1:{proxy.port}/0", RedisKeyBuilder(prefix))
    return RedisCachedStorage(spy, link, **options)


async def fill(cache: RedisCachedStorage, pairs: int, key: ConversationKey = KEY) -> list[str]:
    for index in range(pairs):
        await cache.append(key, [user(f"q{index}", key.user_id or "u1"), ai(f"a{index}")])
    return [f"{role}{i}" for i in range(pairs) for role in ("q", "a")]


def test_key_builder_owns_the_layout() -> None:
    keys = RedisKeyBuilder("bot*1")
    assert keys.window(KEY) == "bot*1:window:telegram:c1:u1"
    assert keys.meta(KEY) == "bot*1:meta:telegram:c1:u1"
    assert keys.lock(KEY) == "bot*1:lock:telegram:c1:u1"
    assert keys.user("telegram", "u1") == "bot*1:user:telegram:u1"
    assert keys.pattern("window") == r"bot\*1:window:*"
    assert RedisKeyBuilder().window(KEY).startswith("kobot:")


@pytest.mark.parametrize(
    ("count", "cached", "limit", "proven"),
    [
        (3, 3, 10, True),
        (10, 6, 6, True),
        (10, 6, 4, True),
        (10, 6, 7, False),
        (5, 0, 1, False),
        (0, 0, 5, True),
        (2, 3, 1, False),
    ],
)
def test_proof_of_a_complete_window(count: int, cached: int, limit: int, proven: bool) -> None:
    assert proves_recent(count, cached, limit) is proven


async def test_recent_is_served_from_redis_once_warm(
    cache: RedisCachedStorage, spy: SpyStorage
) -> None:
    expected = await fill(cache, 2)
    assert texts(await cache.recent(KEY, 10)) == expected  # miss: SQL, then filled
    reads = spy.calls["recent"]

    assert texts(await cache.recent(KEY, 10)) == expected
    await cache.append(KEY, [user("q2"), ai("a2")])  # write-through keeps the window complete
    assert texts(await cache.recent(KEY, 3)) == ["a1", "q2", "a2"]
    assert texts(await cache.recent(KEY, 10)) == [*expected, "q2", "a2"]
    assert spy.calls["recent"] == reads


async def test_limit_beyond_the_window_reads_sql(
    cache: RedisCachedStorage, spy: SpyStorage
) -> None:
    expected = await fill(cache, 5)  # 10 turns, window of 6
    assert texts(await cache.recent(KEY, 4)) == expected[-4:]
    reads = spy.calls["recent"]

    assert texts(await cache.recent(KEY, 6)) == expected[-6:]
    assert spy.calls["recent"] == reads
    assert texts(await cache.recent(KEY, 8)) == expected[-8:]
    assert spy.calls["recent"] == reads + 1


async def test_flush_loses_no_turn(
    cache: RedisCachedStorage, spy: SpyStorage, redis: Redis, redis_prefix: str
) -> None:
    expected = await fill(cache, 3)
    await cache.set_persona(KEY, "해적")
    await cache.recent(KEY, 10)

    assert await delete_redis_keys(redis_prefix) > 0  # what FLUSHALL does to this cache

    assert texts(await cache.recent(KEY, 10)) == expected
    assert await cache.get_persona(KEY) == "해적"
    assert await redis.exists(cache.keys.window(KEY), cache.keys.meta(KEY)) == 2  # refilled
    reads = spy.calls["recent"]
    assert texts(await cache.recent(KEY, 10)) == expected
    assert spy.calls["recent"] == reads


@pytest.mark.parametrize("evicted", ["window", "meta"])
async def test_half_evicted_entry_is_not_trusted(
    cache: RedisCachedStorage, redis: Redis, evicted: str
) -> None:
    expected = await fill(cache, 2)
    await cache.recent(KEY, 10)
    await redis.delete(getattr(cache.keys, evicted)(KEY))

    assert texts(await cache.recent(KEY, 10)) == expected
    assert texts(await cache.recent(KEY, 2)) == expected[-2:]


async def test_values_are_json_with_a_refreshed_ttl(
    cache: RedisCachedStorage, redis: Redis
) -> None:
    await fill(cache, 1)
    await cache.set_persona(KEY, "페르소나")
    await cache.recent(KEY, 10)
    window, meta = cache.keys.window(KEY), cache.keys.meta(KEY)

    items = [json.loads(item) for item in await redis.lrange(window, 0, -1)]
    assert [(item["role"], item["text"], item["user_id"]) for item in items] == [
        ("user", "q0", "u1"),
        ("ai", "a0", "u1"),
    ]
    assert json.loads(str(await redis.hget(meta, "p"))) == "페르소나"
    await redis.expire(window, 5)
    await redis.expire(meta, 5)

    await cache.recent(KEY, 2)
    assert TTL_S - 5 <= await redis.ttl(window) <= TTL_S
    assert TTL_S - 5 <= await redis.ttl(meta) <= TTL_S


async def test_personas_are_cached(cache: RedisCachedStorage, spy: SpyStorage) -> None:
    await cache.set_persona(KEY, "cached")
    assert await cache.get_persona(KEY) == "cached"
    other = ConversationKey("telegram", "c2", "u1")
    assert await cache.get_persona(other) is None  # miss: SQL, then "no persona" is cached
    assert await cache.get_persona(other) is None
    assert spy.calls["get_persona"] == 1


async def test_linked_accounts_are_cached_and_written_through(
    cache: RedisCachedStorage, spy: SpyStorage, redis: Redis, redis_prefix: str
) -> None:
    telegram, discord = Account("telegram", "t1"), Account("discord", "d1")
    other_process = make_cache(spy, redis, redis_prefix)
    assert await other_process.person_of(telegram) is None  # "not linked" is cached now
    assert await other_process.person_of(telegram) is None
    assert spy.calls["person_of"] == 1

    await cache.link("p1", [telegram, discord])
    assert await other_process.person_of(telegram) == "p1"  # the link replaced the cached ""
    await cache.unlink(telegram)
    assert await other_process.person_of(telegram) is None
    assert await other_process.person_of(discord) == "p1"
    assert spy.calls["person_of"] == 1  # all of it served by Redis


async def test_an_unlink_during_an_outage_is_not_hidden_after_it(
    spy: SpyStorage, redis_prefix: str, proxy: TcpProxy
) -> None:
    cache = cache_through(proxy, spy, redis_prefix, retry_after_s=0.0)
    telegram = Account("telegram", "t1")
    await cache.link("p1", [telegram])
    assert await cache.person_of(telegram) == "p1"

    await proxy.stop()
    assert await cache.unlink(telegram) is True
    await proxy.start()

    assert await cache.person_of(telegram) is None
    await cache.close()


async def test_delete_user_drops_cached_windows_holding_their_turns(
    cache: RedisCachedStorage, redis: Redis
) -> None:
    group = ConversationKey("telegram", "g1", "")
    await cache.append(group, [user("from u1", "u1"), ai("to u1", "u1")])
    await cache.append(group, [user("from u2", "u2"), ai("to u2", "u2")])
    await cache.set_persona(KEY, "u1's persona")
    await cache.recent(group, 10)

    assert await cache.delete_user("telegram", "u1") == 2

    assert texts(await cache.recent(group, 10)) == ["from u2", "to u2"]
    assert await cache.get_persona(KEY) is None
    cached = " ".join(map(str, await redis.lrange(cache.keys.window(group), 0, -1)))
    assert "from u1" not in cached and "from u2" in cached
    assert not await redis.exists(cache.keys.user("telegram", "u1"))


async def test_purge_drops_cached_old_turns(cache: RedisCachedStorage) -> None:
    old = datetime.now(UTC) - timedelta(days=100)
    await cache.append(KEY, [user("old", created_at=old), ai("old a", created_at=old)])
    await cache.append(KEY, [user("new"), ai("new a")])
    await cache.recent(KEY, 10)

    assert await cache.purge_before(datetime.now(UTC) - timedelta(days=1)) == 2

    assert texts(await cache.recent(KEY, 10)) == ["new", "new a"]


async def test_a_fill_from_an_older_read_never_overwrites_a_write(
    cache: RedisCachedStorage, spy: SpyStorage
) -> None:
    """Reader reads SQL, writer appends (SQL + Redis), then the reader's stale fill is refused."""
    expected = await fill(cache, 1)
    spy.pause_after.add("recent")
    reader = asyncio.create_task(cache.recent(KEY, 10))
    await spy.paused.wait()  # the reader holds a SQL result without the next turns

    await cache.append(KEY, [user("q1"), ai("a1")])
    spy.resume.set()
    assert texts(await reader) == expected

    assert texts(await cache.recent(KEY, 10)) == [*expected, "q1", "a1"]
    assert texts(await cache.recent(KEY, 10)) == [*expected, "q1", "a1"]


@pytest.mark.parametrize("warm", [False, True])
async def test_a_write_never_lands_twice(
    cache: RedisCachedStorage, spy: SpyStorage, warm: bool
) -> None:
    """Writer stores in SQL and stalls; a reader fills the cache meanwhile; no duplicate after."""
    expected = await fill(cache, 1)
    if warm:
        await cache.recent(KEY, 10)
    spy.pause_after.add("append")
    writer = asyncio.create_task(cache.append(KEY, [user("q1"), ai("a1")]))
    await spy.paused.wait()  # in SQL, not yet in Redis

    seen = texts(await cache.recent(KEY, 10))
    assert seen in (expected, [*expected, "q1", "a1"])
    spy.resume.set()
    await writer

    assert texts(await cache.recent(KEY, 10)) == [*expected, "q1", "a1"]
    assert texts(await cache.recent(KEY, 10)) == [*expected, "q1", "a1"]


async def test_redis_down_serves_from_sql(
    spy: SpyStorage, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    cache = RedisCachedStorage(spy, RedisLink.open(url), window_turns=WINDOW)
    caplog.set_level(logging.WARNING, logger="storage.redis.client")

    expected = await fill(cache, 2)
    assert texts(await cache.recent(KEY, 10)) == expected
    await cache.set_persona(KEY, "p")
    assert await cache.get_persona(KEY) == "p"
    await cache.clear(KEY)
    assert await cache.recent(KEY, 10) == []
    assert await cache.delete_user("telegram", "u1") == 4
    await cache.close()

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once per outage, not once per call
    assert "Redis at 127.0.0.1" in warnings[0] and "database" in warnings[0]
    assert "hunter2" not in caplog.text


async def test_turns_written_during_an_outage_are_not_hidden_after_it(
    spy: SpyStorage, redis_prefix: str, proxy: TcpProxy
) -> None:
    """Redis stays up but unreachable while we write; once back it still holds the old window."""
    cache = cache_through(proxy, spy, redis_prefix, window_turns=WINDOW, retry_after_s=0.0)
    expected = await fill(cache, 1)
    await cache.get_persona(KEY)
    await cache.recent(KEY, 10)  # the window is cached and complete

    await proxy.stop()
    await cache.append(KEY, [user("during"), ai("outage")])
    await cache.set_persona(KEY, "set during the outage")
    assert texts(await cache.recent(KEY, 10)) == [*expected, "during", "outage"]

    await proxy.start()
    assert texts(await cache.recent(KEY, 10)) == [*expected, "during", "outage"]
    assert await cache.get_persona(KEY) == "set during the outage"
    reads = spy.calls["recent"]
    assert texts(await cache.recent(KEY, 10)) == [*expected, "during", "outage"]
    assert spy.calls["recent"] == reads  # and the cache is in use again
    await cache.close()


async def test_clear_is_served_from_the_cache(cache: RedisCachedStorage, spy: SpyStorage) -> None:
    await fill(cache, 2)
    await cache.recent(KEY, 10)
    await cache.clear(KEY)
    reads = spy.calls["recent"]

    assert await cache.recent(KEY, 10) == []
    await cache.append(KEY, [user("fresh")])
    assert texts(await cache.recent(KEY, 10)) == ["fresh"]
    assert spy.calls["recent"] == reads


async def test_a_failing_redis_is_left_alone_for_a_while(
    spy: SpyStorage, redis_prefix: str, proxy: TcpProxy
) -> None:
    proxy.broken = True
    cache = cache_through(proxy, spy, redis_prefix, retry_after_s=60)

    expected = await fill(cache, 3)
    for _ in range(5):
        assert texts(await cache.recent(KEY, 10)) == expected

    assert 1 <= proxy.connections <= 2  # the first failure (and its one retry), then nothing
    await cache.close()


async def test_delete_user_reaches_windows_written_while_it_ran(
    cache: RedisCachedStorage, spy: SpyStorage, redis: Redis
) -> None:
    """A turn cached between delete_user's look-up and its SQL delete is still dropped."""
    await cache.append(KEY, [user("old"), ai("old a")])
    late = ConversationKey("telegram", "g2", "")
    spy.pause_after.add("export_user")
    deleting = asyncio.create_task(cache.delete_user("telegram", "u1"))
    await spy.paused.wait()

    await cache.append(late, [user("late u1", "u1"), ai("to u1", "u1"), user("u2", "u2")])
    await cache.recent(late, 10)
    spy.resume.set()
    assert await deleting == 4

    assert texts(await cache.recent(late, 10)) == ["u2"]
    assert "late u1" not in " ".join(map(str, await redis.lrange(cache.keys.window(late), 0, -1)))
