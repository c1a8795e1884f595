"""Conversation locks: one turn at a time per conversation, in a process and across processes."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.locks import ConversationLocks, InProcessLocks, LockTimeout, RedisLocks, build_locks
from core.messages import ConversationKey, Role
from core.settings import Settings
from storage.redis_cache import RedisKeyBuilder, redis_client
from storage.sql import SqlStorage
from tests.services import REDIS_URL, PostgresSchema, closed_port, redis_key_prefix
from tests.storage._worker import KEY as WORKER_KEY
from tests.storage.helpers import finish, start_together

KEY = ConversationKey("telegram", "c1", "u1")
OTHER = ConversationKey("telegram", "c2", "u1")


@pytest.fixture(params=["in-process", "redis"])
async def locks(request: pytest.FixtureRequest) -> AsyncIterator[ConversationLocks]:
    if request.param == "in-process":
        yield InProcessLocks(10)
        return
    async with redis_key_prefix() as prefix:
        shared = RedisLocks(
            redis_client(REDIS_URL), keys=RedisKeyBuilder(prefix), timeout_s=10, wait_s=10,
            poll_s=0.005, owns_redis=True,
        )  # fmt: skip
        yield shared
        await shared.close()


async def critical_sections(locks: ConversationLocks, keys: list[ConversationKey]) -> list[str]:
    """Enter/leave events of concurrent holders, each holding for a few event-loop turns."""
    events: list[str] = []

    async def hold(number: int, key: ConversationKey) -> None:
        async with locks.lock(key):
            events.append(f"enter {number}")
            await asyncio.sleep(0.01)
            events.append(f"leave {number}")

    await asyncio.gather(*(hold(number, key) for number, key in enumerate(keys)))
    return events


async def test_same_conversation_is_serialized(locks: ConversationLocks) -> None:
    events = await critical_sections(locks, [KEY, KEY, KEY])
    assert all(e.startswith("enter") for e in events[::2])
    assert [e.split()[1] for e in events[::2]] == [e.split()[1] for e in events[1::2]]


async def test_different_conversations_run_concurrently(locks: ConversationLocks) -> None:
    inside: list[ConversationKey] = []
    both_inside = asyncio.Event()

    async def hold(key: ConversationKey) -> None:
        async with locks.lock(key):
            inside.append(key)
            if len(inside) == 2:
                both_inside.set()
            await asyncio.wait_for(both_inside.wait(), 5)  # times out if serialized

    await asyncio.gather(hold(KEY), hold(OTHER))


async def test_in_process_entries_are_dropped_when_unused() -> None:
    locks = InProcessLocks(0.05)
    await critical_sections(locks, [ConversationKey("t", str(n), "u") for n in range(500)])
    assert len(locks) == 0

    async with locks.lock(KEY):
        assert len(locks) == 1
        with pytest.raises(LockTimeout, match=r"telegram:c1:u1 is still busy after 0\.05 s"):
            async with locks.lock(KEY):
                pass
        waiter = asyncio.create_task(critical_sections(locks, [KEY]))
        for _ in range(3):
            await asyncio.sleep(0)  # let the waiter start waiting
        assert not waiter.done()
        waiter.cancel()  # a cancelled waiter must not keep the entry or the lock
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert len(locks) == 0
    async with asyncio.timeout(1), locks.lock(KEY):
        pass


async def test_redis_lock_is_shared_by_separate_clients(redis_prefix: str, redis: Redis) -> None:
    """Two RedisLocks with their own clients behave like two processes."""
    keys = RedisKeyBuilder(redis_prefix)
    first = RedisLocks(redis_client(REDIS_URL), keys=keys, timeout_s=7, owns_redis=True)
    second = RedisLocks(redis_client(REDIS_URL), keys=keys, wait_s=0.05, owns_redis=True)

    async with first.lock(KEY):
        assert 0 < await redis.pttl(keys.lock(KEY)) <= 7000
        with pytest.raises(LockTimeout):
            async with second.lock(KEY):
                pass
        async with second.lock(OTHER):
            pass
    assert not await redis.exists(keys.lock(KEY))
    async with second.lock(KEY):
        pass
    await first.close()
    await second.close()


@pytest.fixture
async def redis(redis_prefix: str) -> AsyncIterator[Redis]:
    client = redis_client(REDIS_URL)
    yield client
    await client.aclose()


async def test_an_expired_redis_lock_is_reported_not_raised(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    locks = RedisLocks(
        redis_client(REDIS_URL), keys=RedisKeyBuilder(redis_prefix), timeout_s=0.05,
        owns_redis=True,
    )  # fmt: skip
    async with locks.lock(KEY):
        await asyncio.sleep(0.15)
    assert "expired after 0.05 s while held" in caplog.text
    await locks.close()


async def test_redis_down_falls_back_to_in_process_locks(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    locks = RedisLocks(redis_client(url), wait_s=5, owns_redis=True)

    events = await critical_sections(locks, [KEY, KEY])

    assert events == ["enter 0", "leave 0", "enter 1", "leave 1"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "in this process only" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text
    await locks.close()


async def test_build_locks_follows_the_settings() -> None:
    plain = Settings(_env_file=None)  # type: ignore[call-arg]
    shared = Settings(_env_file=None, redis_url=REDIS_URL, lock_timeout_s=42)  # type: ignore[call-arg]
    assert isinstance(build_locks(plain), InProcessLocks)
    redis_locks = build_locks(shared)
    assert isinstance(redis_locks, RedisLocks)
    await redis_locks.close()


async def test_two_processes_never_interleave_a_conversation(
    pg_schema: PostgresSchema, redis_prefix: str, tmp_path: Path
) -> None:
    """Each worker: lock -> read recent -> append user -> (pause) -> append AI, many times."""
    cycles = 15
    storage = await SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args)
    job = {
        "mode": "lock", "url": pg_schema.url, "connect_args": pg_schema.connect_args,
        "redis_url": REDIS_URL, "prefix": redis_prefix, "cycles": cycles,
    }  # fmt: skip
    workers = await start_together([{**job, "tag": "A"}, {**job, "tag": "B"}])
    reports = [json.loads(await finish(worker)) for worker in workers]

    history = await storage.recent(WORKER_KEY, 1000)
    await storage.close()
    assert [r["violations"] for r in reports] == [0, 0]
    assert (
        reports[0]["started"] < reports[1]["ended"] and reports[1]["started"] < reports[0]["ended"]
    )
    assert len(history) == 2 * 2 * cycles
    pairs = list(zip(history[::2], history[1::2], strict=True))
    assert all(q.role is Role.USER and a.role is Role.AI for q, a in pairs)
    assert all(q.text[:-1] == a.text[:-1] and q.user_id == a.user_id for q, a in pairs)
    for tag in "AB":
        assert [q.text for q, _ in pairs if q.user_id == tag] == [
            f"{tag}-{i}-q" for i in range(cycles)
        ]
