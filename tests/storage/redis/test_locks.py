"""Conversation locks: one turn at a time per conversation, in a process and across processes."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from core.dialogue.manager import DialogueManager
from core.dialogue.services import DialogueServices
from core.generation.base import GenerationBackend, GenerationRequest, GenerationResult
from core.generation.factory import build_backend
from core.generation.tokenizer import KoGPT2Tokenizer
from core.messages import ConversationKey, Role
from core.settings import Settings
from storage.factory import build_locks
from storage.locks import ConversationLocks, InProcessLocks, LeaseLost, LockTimeout
from storage.memory import MemoryStorage
from storage.redis.client import RedisLink, redis_client
from storage.redis.keys import RedisKeyBuilder
from storage.redis.locks import RedisLocks
from storage.sql import SqlStorage
from tests.storage._worker import KEY as WORKER_KEY
from tests.support.backends import RecordingBackend
from tests.support.dialogue import make_settings, message
from tests.support.services import (
    REDIS_URL,
    PostgresSchema,
    closed_port,
    delete_redis_keys,
    redis_key_prefix,
)
from tests.support.storage import TcpProxy, ai, finish, start_together, start_worker, user

KEY = ConversationKey("telegram", "c1", "u1")
OTHER = ConversationKey("telegram", "c2", "u1")


@pytest.fixture(params=["in-process", "redis"])
async def locks(request: pytest.FixtureRequest) -> AsyncIterator[ConversationLocks]:
    if request.param == "in-process":
        yield InProcessLocks(10)
        return
    async with redis_key_prefix() as prefix:
        link = RedisLink.open(REDIS_URL, RedisKeyBuilder(prefix))
        shared = RedisLocks(link, lease_s=10, wait_s=10, poll_s=0.005)
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
        with pytest.raises(LockTimeout, match=r"still busy after 0\.05 s"):
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
    first = RedisLocks(RedisLink.open(REDIS_URL, keys), lease_s=7)
    second = RedisLocks(RedisLink.open(REDIS_URL, keys), wait_s=0.05)

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


async def test_a_held_lock_is_renewed_past_its_lease(redis_prefix: str, redis: Redis) -> None:
    keys = RedisKeyBuilder(redis_prefix)
    holder = RedisLocks(RedisLink.open(REDIS_URL, keys), lease_s=0.3)
    other = RedisLocks(RedisLink.open(REDIS_URL, keys), wait_s=0.05)
    async with holder.lock(KEY) as lease:
        await asyncio.sleep(1.0)  # more than three leases
        assert 0 < await redis.pttl(keys.lock(KEY)) <= 300
        with pytest.raises(LockTimeout):
            async with other.lock(KEY):
                pass
        await lease.confirm()
    assert not await redis.exists(keys.lock(KEY))
    await holder.close()
    await other.close()


async def test_a_killed_holders_lock_is_free_within_one_lease(redis_prefix: str) -> None:
    """A real process holds the lock and is SIGKILLed: the next holder waits at most a lease."""
    lease_s = 1.0
    job = {"mode": "hold", "redis_url": REDIS_URL, "prefix": redis_prefix, "lease_s": lease_s}
    worker = await start_worker(job)
    assert worker.stdout is not None
    assert await asyncio.wait_for(worker.stdout.readline(), 60) == b"held\n"
    await asyncio.sleep(0.8)  # the holder renewed its lease at least twice by now
    worker.kill()
    await worker.wait()
    killed = time.monotonic()
    locks = RedisLocks(
        RedisLink.open(REDIS_URL, RedisKeyBuilder(redis_prefix)), wait_s=30, poll_s=0.01
    )
    async with locks.lock(KEY):
        waited = time.monotonic() - killed
    await locks.close()
    assert waited <= lease_s + 0.3


async def test_a_flushed_lock_is_lost_and_said_so(
    redis_prefix: str, redis: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis flushed while held: another worker may take the lock; the first one's `confirm`
    fails (so it stores nothing), and no line blames a 300 s timeout."""
    keys = RedisKeyBuilder(redis_prefix)
    first = RedisLocks(RedisLink.open(REDIS_URL, keys), lease_s=0.3)
    second = RedisLocks(RedisLink.open(REDIS_URL, keys), wait_s=1)
    async with first.lock(KEY) as lease:
        await delete_redis_keys(redis_prefix)  # what FLUSHDB does to this bot's keys
        async with second.lock(KEY):
            with pytest.raises(LeaseLost, match="expired or Redis was flushed or restarted"):
                await lease.confirm()
    (line,) = [r.getMessage() for r in caplog.records if "lost the lock of" in r.getMessage()]
    assert line.endswith("it expired or Redis was flushed or restarted")
    assert "300 s" not in caplog.text
    assert not re.search(r"\b(c1|u1)\b", caplog.text)  # hashed ids only (hex may hold "c1")
    await first.close()
    await second.close()


async def test_redis_down_falls_back_to_in_process_locks(caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://:hunter2@127.0.0.1:{closed_port()}/0"
    locks = RedisLocks(RedisLink.open(url), wait_s=5)

    events = await critical_sections(locks, [KEY, KEY])

    assert events == ["enter 0", "leave 0", "enter 1", "leave 1"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "in this process only" in warnings[0].getMessage()
    assert "hunter2" not in caplog.text
    await locks.close()


async def test_an_outage_is_reported_once_and_its_end_too(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Down: one warning however many turns lock meanwhile; back: one note, and locks are
    shared again; the next outage is reported afresh."""
    proxy = TcpProxy("127.0.0.1", 6379)
    await proxy.start()
    link = RedisLink.open(f"redis://127.0.0.1:{proxy.port}/0", RedisKeyBuilder(redis_prefix))
    locks = RedisLocks(link, wait_s=5)
    caplog.set_level(logging.INFO, logger="storage.redis.client")

    def reports() -> list[tuple[int, str]]:
        return [(r.levelno, r.getMessage()) for r in caplog.records if "Redis at" in r.getMessage()]

    for outage in range(2):
        await proxy.stop()
        await critical_sections(locks, [KEY, OTHER, KEY])
        assert link.in_outage
        await proxy.start()
        async with locks.lock(KEY):
            assert await link.client.exists(link.keys.lock(KEY)) == 1
        levels = [level for level, _ in reports()]
        assert levels == [logging.WARNING, logging.INFO] * (outage + 1)
    assert reports()[-1][1].endswith("is reachable again; conversation locks are shared again")
    await locks.close()
    await proxy.stop()


async def test_build_locks_follows_the_settings() -> None:
    plain = Settings(_env_file=None)  # type: ignore[call-arg]
    shared = Settings(_env_file=None, redis_url=REDIS_URL, lock_timeout_s=42, lock_lease_s=7)  # type: ignore[call-arg]
    assert isinstance(build_locks(plain.lock_options()), InProcessLocks)
    redis_locks = build_locks(shared.lock_options())
    assert isinstance(redis_locks, RedisLocks)
    assert (redis_locks._lease_s, redis_locks._wait_s) == (7, 42)
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


class FlushingBackend(RecordingBackend):
    """The first generation: Redis loses the lock (flushed), and another worker takes it and
    stores a turn of its own before this one finishes."""

    def __init__(self, inner: GenerationBackend, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.other = RedisLocks(RedisLink.open(REDIS_URL, RedisKeyBuilder(prefix)))
        self.storage: MemoryStorage | None = None

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if len(self.requests) == 0:
            assert self.storage is not None
            await delete_redis_keys(self.prefix)
            async with self.other.lock(MANAGER_KEY):
                await self.storage.append(MANAGER_KEY, [user("다른 워커", "u1"), ai("그쪽 답")])
        return await super().generate(request)


MANAGER_KEY = ConversationKey("test", "c1", "u1")


async def test_a_turn_whose_lock_was_lost_is_not_stored_over_another(
    redis_prefix: str, tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tiny_model_dir, tmp_path)
    backend = FlushingBackend(build_backend(settings), redis_prefix)
    storage = MemoryStorage()
    backend.storage = storage
    locks = RedisLocks(RedisLink.open(REDIS_URL, RedisKeyBuilder(redis_prefix)))
    manager = DialogueManager(DialogueServices(settings, storage, backend, locks))

    reply = await manager.handle(message("내 질문", message_id="m1"))

    history = await storage.recent(MANAGER_KEY, 10)
    assert [turn.text for turn in history] == ["다른 워커", "그쪽 답", "내 질문", reply.text]
    assert len(backend.requests) == 2  # the first reply was thrown away, not stored
    tokenizer = backend.tokenizer
    assert isinstance(tokenizer, KoGPT2Tokenizer)
    assert "다른 워커" in tokenizer.decode(backend.requests[1].prompt_ids)
    assert "not stored, answering again" in caplog.text
    await backend.other.close()
    await manager.close()
