"""Building each storage backend for tests, and spies that wrap a real storage."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from core.messages import Role, Turn
from storage.base import Storage, StorageWrapper
from storage.memory import MemoryStorage
from storage.redis.cache import RedisCachedStorage
from storage.redis.client import RedisLink
from storage.redis.keys import RedisKeyBuilder
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
            link = RedisLink.open(REDIS_URL, RedisKeyBuilder(prefix))
            options = {"window_turns": TEST_WINDOW_TURNS, **cache_options}
            cached = RedisCachedStorage(sql, link, **options)
            try:
                yield cached
            finally:
                await cached.close()


COUNTED = (
    "append", "recent", "find_reply", "reply_to", "set_delivery", "replace_last_reply", "clear",
    "delete_user", "export_user", "get_persona", "set_persona", "person_of", "purge_before",
)  # fmt: skip
"""The `Storage` calls a `SpyStorage` counts (the others only pass through)."""


def _counted(name: str) -> Callable[..., Awaitable[Any]]:
    """A `Storage` method that passes the call through, then counts it (and may pause)."""

    async def call(self: SpyStorage, *args: Any, **kwargs: Any) -> Any:
        result = await getattr(self.inner, name)(*args, **kwargs)
        await self._done(name)
        return result

    call.__name__ = name
    return call


def _counting(cls: type[SpyStorage]) -> type[SpyStorage]:
    for name in COUNTED:
        setattr(cls, name, _counted(name))
    return cls


@_counting
class SpyStorage(StorageWrapper):
    """Delegates to a real storage, counting the calls the tests watch; can pause right after
    chosen calls (`pause_after`: `paused` is set, the call returns once `resume` is)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
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
