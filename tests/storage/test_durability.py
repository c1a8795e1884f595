"""A killed process loses nothing it acknowledged; concurrent start-ups migrate once."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from storage.sql import SqlStorage, upgrade_database
from tests.storage._worker import KEY
from tests.support.storage import database, finish, start_together, start_worker, texts

ACKS_BEFORE_KILL = 30


async def read_acks(worker: asyncio.subprocess.Process, wanted: int) -> int:
    """The number of the last exchange the worker reported stored, once it reached `wanted`."""
    assert worker.stdout is not None
    last = -1
    while last < wanted:
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        if not line:
            await finish(worker)  # raises with the worker's stderr
            pytest.fail("the worker stopped before being killed")
        last = int(line.split()[1])
    return last


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_sigkill_between_messages_loses_no_turn(kind: str, tmp_path: Path) -> None:
    async with database(kind, tmp_path) as (url, connect_args):
        await upgrade_database(url, connect_args)
        worker = await start_worker({"mode": "append", "url": url, "connect_args": connect_args})
        acked = await read_acks(worker, ACKS_BEFORE_KILL)
        worker.kill()  # SIGKILL: no clean-up, possibly in the middle of an append
        await worker.wait()

        storage = await SqlStorage.create(url, connect_args=connect_args)
        stored = texts(await storage.recent(KEY, 1_000_000))
        await storage.close()

    assert len(stored) % 2 == 0, "an exchange was stored half"
    assert len(stored) >= 2 * (acked + 1)
    assert stored == [f"{role}{i}" for i in range(len(stored) // 2) for role in ("q", "a")]


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_workers_starting_together_migrate_once(kind: str, tmp_path: Path) -> None:
    async with database(kind, tmp_path) as (url, connect_args):
        job = {"mode": "migrate", "url": url, "connect_args": connect_args}
        workers = await start_together([dict(job) for _ in range(2)])
        outputs = [await finish(worker) for worker in workers]
        storage = await SqlStorage.create(url, connect_args=connect_args, upgrade=False)
        assert await storage.stats() == {"turns": 0, "users": 0, "conversations": 0}
        await storage.close()

    assert outputs == ["migrated\n"] * 2
