"""`Storage.ping()`, the seam `/healthz` reads: every backend answers, an unreachable one raises."""

from __future__ import annotations

import pytest

from storage.base import Storage, StorageError
from storage.sql import SqlStorage
from tests.support.services import closed_port

ANSWERS = {
    "memory": "MemoryStorage",
    "sqlite": "sqlite",
    "postgres": "postgresql",
    "redis+postgres": "postgresql",  # the store of record under the cache
}


async def test_every_backend_answers_a_ping(
    storage: Storage, request: pytest.FixtureRequest
) -> None:
    backend = request.node.callspec.params["storage"]
    assert await storage.ping() == ANSWERS[backend]


async def test_an_unreachable_database_fails_the_ping() -> None:
    url = f"postgresql+asyncpg://kobot@127.0.0.1:{closed_port()}/test"
    storage = await SqlStorage.create(url, upgrade=False)
    try:
        with pytest.raises(StorageError, match="pinging the database failed"):
            await storage.ping()
    finally:
        await storage.close()
