"""A separate OS process for the storage tests: `python -m tests.storage._worker '<json job>'`.

Modes: `migrate` (upgrade the schema once told to go), `append` (append exchanges and report each
one acknowledged, until killed), `lock` (lock -> read -> append user -> append AI cycles),
`hold` (hold the conversation's lock until killed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from core.messages import ConversationKey, Role, Turn
from storage.base import Storage
from storage.redis.cache import RedisCachedStorage
from storage.redis.client import RedisLink
from storage.redis.keys import RedisKeyBuilder
from storage.redis.locks import RedisLocks
from storage.sql import SqlStorage, upgrade_database

KEY = ConversationKey("telegram", "c1", "")


async def wait_for_go() -> None:
    """Tell the parent we are ready, then wait for its `go` line (all workers start together)."""
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)


async def migrate(job: dict[str, Any]) -> None:
    await wait_for_go()
    await upgrade_database(job["url"], job["connect_args"])
    print("migrated", flush=True)


async def append_until_killed(job: dict[str, Any]) -> None:
    storage = await SqlStorage.create(job["url"], connect_args=job["connect_args"])
    for index in range(1_000_000):
        turns = [Turn(Role.USER, f"q{index}", "u1"), Turn(Role.AI, f"a{index}", "u1")]
        await storage.append(KEY, turns)
        print(f"acked {index}", flush=True)


async def open_cached(job: dict[str, Any]) -> Storage:
    sql = await SqlStorage.create(job["url"], connect_args=job["connect_args"])
    keys = RedisKeyBuilder(job["prefix"])
    return RedisCachedStorage(sql, RedisLink.open(job["redis_url"], keys), window_turns=4)


def consistent(history: list[Turn]) -> bool:
    """Whole exchanges only: user then AI, both from the same worker and cycle."""
    if len(history) % 2:
        return False
    pairs = zip(history[::2], history[1::2], strict=True)
    return all(
        q.role is Role.USER and a.role is Role.AI and q.text[:-1] == a.text[:-1] for q, a in pairs
    )


async def lock_cycles(job: dict[str, Any]) -> None:
    storage = await open_cached(job)
    keys = RedisKeyBuilder(job["prefix"])
    locks = RedisLocks(RedisLink.open(job["redis_url"], keys), lease_s=30, wait_s=30, poll_s=0.002)
    tag, violations = job["tag"], 0
    await wait_for_go()
    started = time.time()
    for index in range(job["cycles"]):
        async with locks.lock(KEY):
            violations += not consistent(await storage.recent(KEY, 1000))
            await storage.append(KEY, [Turn(Role.USER, f"{tag}-{index}-q", tag)])
            await asyncio.sleep(0.003)  # without the lock, the other worker would cut in here
            await storage.append(KEY, [Turn(Role.AI, f"{tag}-{index}-a", tag)])
        await asyncio.sleep(0.001)
    print(json.dumps({"violations": violations, "started": started, "ended": time.time()}))
    await locks.close()
    await storage.close()


async def hold_until_killed(job: dict[str, Any]) -> None:
    """Take the conversation's lock (a lease of `lease_s`, renewed) and hold it until killed."""
    keys = RedisKeyBuilder(job["prefix"])
    locks = RedisLocks(RedisLink.open(job["redis_url"], keys), lease_s=job["lease_s"])
    async with locks.lock(KEY):
        print("held", flush=True)
        await asyncio.sleep(3600)


MODES = {
    "migrate": migrate,
    "append": append_until_killed,
    "lock": lock_cycles,
    "hold": hold_until_killed,
}

if __name__ == "__main__":
    job = json.loads(sys.argv[1])
    asyncio.run(MODES[job["mode"]](job))
