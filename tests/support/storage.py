"""Building each storage backend for tests, and spies that wrap a real storage."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from core.messages import ConversationKey, Role, Turn
from storage.base import (
    Account,
    Delivery,
    DeliveryRecord,
    InboxItem,
    LinkCode,
    Storage,
    StoredReply,
    UserExport,
)
from storage.memory import MemoryStorage
from storage.redis.cache import RedisCachedStorage, RedisKeyBuilder, redis_client
from storage.sql import SqlStorage
from tests.support.services import REDIS_URL, postgres_schema, redis_key_prefix, require_redis

ROOT = Path(__file__).resolve().parents[2]

BACKENDS = ["memory", "sqlite", "postgres", "redis+postgres"]
TEST_WINDOW_TURNS = 4  # small, so the tests cross the window boundary often


def sqlite_url(directory: Path) -> str:
    return f"sqlite+aiosqlite:///{directory / 'kobot.db'}"


def user(text: str, user_id: str = "u1", message_id: str = "", **fields: Any) -> Turn:
    return Turn(Role.USER, text, user_id, message_id=message_id, **fields)


def ai(text: str, user_id: str = "u1", **fields: Any) -> Turn:
    return Turn(Role.AI, text, user_id, **fields)


def texts(turns: Sequence[Turn]) -> list[str]:
    return [turn.text for turn in turns]


@asynccontextmanager
async def database(kind: str, directory: Path) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """An empty database, `sqlite` (a file) or `postgres` (a private schema): url, connect_args."""
    if kind == "sqlite":
        yield sqlite_url(directory), {}
        return
    async with postgres_schema() as schema:
        yield schema.url, schema.connect_args


async def start_worker(job: dict[str, Any]) -> asyncio.subprocess.Process:
    """`tests/storage/_worker.py` in a new Python process (stdin and stdout piped)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.storage._worker", json.dumps(job), cwd=ROOT,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def start_together(jobs: list[dict[str, Any]]) -> list[asyncio.subprocess.Process]:
    """Start workers, wait until each says `ready` (imports done, connected), then say `go`."""
    workers = [await start_worker(job) for job in jobs]
    for worker in workers:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        if line != b"ready\n":
            await finish(worker)
            raise AssertionError(f"worker did not get ready: {line!r}")
    for worker in workers:
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        await worker.stdin.drain()
    return workers


async def finish(worker: asyncio.subprocess.Process, timeout_s: float = 60) -> str:
    """Wait for a worker; its stdout, or an AssertionError carrying its stderr."""
    out, err = await asyncio.wait_for(worker.communicate(), timeout_s)
    if worker.returncode != 0:
        raise AssertionError(f"worker failed ({worker.returncode}):\n{err.decode()}")
    return out.decode()


@asynccontextmanager
async def open_storage(
    backend: str, directory: Path, **cache_options: Any
) -> AsyncIterator[Storage]:
    """A fresh, empty storage of the named backend, closed (and its server data removed) after."""
    if backend == "memory":
        yield MemoryStorage()
        return
    if backend == "sqlite":
        sqlite = await SqlStorage.create(sqlite_url(directory))
        try:
            yield sqlite
        finally:
            await sqlite.close()
        return
    if backend == "redis+postgres":
        await require_redis()  # skip naming Redis before touching PostgreSQL
    async with postgres_schema() as schema:
        sql = await SqlStorage.create(schema.url, connect_args=schema.connect_args)
        if backend == "postgres":
            try:
                yield sql
            finally:
                await sql.close()
            return
        async with redis_key_prefix() as prefix:
            options = {"window_turns": TEST_WINDOW_TURNS, "keys": RedisKeyBuilder(prefix)}
            cached = RedisCachedStorage(
                sql, redis_client(REDIS_URL), owns_redis=True, **{**options, **cache_options}
            )
            try:
                yield cached
            finally:
                await cached.close()


class SpyStorage(Storage):
    """Delegates to a real storage, counting calls; can pause right after chosen calls."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self.pause_after: set[str] = set()
        self.paused = asyncio.Event()
        self.resume = asyncio.Event()

    async def _done(self, name: str) -> None:
        self.calls[name] += 1
        if name in self.pause_after:
            self.pause_after.discard(name)
            self.paused.set()
            await self.resume.wait()

    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        await self.inner.append(key, turns, delivery)
        await self._done("append")

    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        result = await self.inner.recent(key, limit)
        await self._done("recent")
        return result

    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        result = await self.inner.find_reply(key, message_id)
        await self._done("find_reply")
        return result

    async def reply_to(self, key: ConversationKey, message_id: str) -> StoredReply | None:
        result = await self.inner.reply_to(key, message_id)
        await self._done("reply_to")
        return result

    async def set_delivery(self, key: ConversationKey, record: DeliveryRecord) -> bool:
        result = await self.inner.set_delivery(key, record)
        await self._done("set_delivery")
        return result

    async def inbox_add(self, items: Sequence[InboxItem]) -> list[InboxItem]:
        return await self.inner.inbox_add(items)

    async def inbox_pending(self, platform: str) -> list[InboxItem]:
        return await self.inner.inbox_pending(platform)

    async def inbox_note(self, platform: str, item_id: str, note: str) -> None:
        await self.inner.inbox_note(platform, item_id, note)

    async def inbox_done(self, platform: str, item_id: str) -> None:
        await self.inner.inbox_done(platform, item_id)

    async def inbox_prune(self, before: datetime) -> int:
        return await self.inner.inbox_prune(before)

    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        result = await self.inner.replace_last_reply(key, text, message_id)
        await self._done("replace_last_reply")
        return result

    async def clear(self, key: ConversationKey) -> None:
        await self.inner.clear(key)
        await self._done("clear")

    async def delete_user(self, platform: str, user_id: str) -> int:
        result = await self.inner.delete_user(platform, user_id)
        await self._done("delete_user")
        return result

    async def export_user(self, platform: str, user_id: str) -> UserExport:
        result = await self.inner.export_user(platform, user_id)
        await self._done("export_user")
        return result

    async def get_persona(self, key: ConversationKey) -> str | None:
        result = await self.inner.get_persona(key)
        await self._done("get_persona")
        return result

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        await self.inner.set_persona(key, persona)
        await self._done("set_persona")

    async def link_code_put(self, code: LinkCode) -> None:
        await self.inner.link_code_put(code)

    async def link_code_take(self, digest: str, now: datetime) -> Account | None:
        return await self.inner.link_code_take(digest, now)

    async def person_of(self, account: Account) -> str | None:
        result = await self.inner.person_of(account)
        await self._done("person_of")
        return result

    async def accounts_of(self, person_id: str) -> list[Account]:
        return await self.inner.accounts_of(person_id)

    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        await self.inner.link(person_id, accounts)

    async def unlink(self, account: Account) -> bool:
        return await self.inner.unlink(account)

    async def purge_before(self, cutoff: datetime) -> int:
        result = await self.inner.purge_before(cutoff)
        await self._done("purge_before")
        return result

    async def stats(self) -> dict[str, int]:
        return await self.inner.stats()

    async def ping(self) -> str:
        return await self.inner.ping()

    async def close(self) -> None:
        await self.inner.close()


class TcpProxy:
    """A port forwarded to a server: `stop()` is an outage (connections cut), `start()` heals."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.broken = False  # accept connections and cut them at once (a failing server)
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.broken:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
            )
        finally:
            self._writers.difference_update((writer, upstream_writer))

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()
