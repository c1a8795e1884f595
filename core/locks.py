"""One turn at a time per conversation: a lock per `ConversationKey`, in process or in Redis.

`InProcessLocks` serializes the coroutines of one process. `RedisLocks` serializes several bot
processes that share a Redis; each process first queues on its own in-process lock, so only one
of its coroutines polls Redis per conversation. Different conversations never wait for each other.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockNotOwnedError

from core.messages import ConversationKey
from storage.redis_cache import (
    REDIS_ERRORS,
    RedisKeyBuilder,
    describe_client,
    describe_redis_error,
    redis_client,
)

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger(__name__)


class LockTimeout(Exception):
    """A conversation stayed locked longer than the caller was willing to wait."""

    def __init__(self, key: ConversationKey, waited_s: float) -> None:
        super().__init__(f"conversation {key.as_id()} is still busy after {waited_s:g} s")
        self.key = key
        self.waited_s = waited_s


class ConversationLocks(abc.ABC):
    """`async with locks.lock(key):` holds the conversation for one turn."""

    @abc.abstractmethod
    def lock(self, key: ConversationKey) -> AbstractAsyncContextManager[None]:
        """Wait for the conversation (raising `LockTimeout` after the wait limit) and hold it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


@dataclass(slots=True)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters; the entry is dropped when it reaches zero


class InProcessLocks(ConversationLocks):
    """One `asyncio.Lock` per conversation in use; entries vanish when nobody holds or waits."""

    def __init__(self, wait_s: float | None = 300.0) -> None:
        self._wait_s = wait_s
        self._entries: dict[ConversationKey, _Entry] = {}

    def __len__(self) -> int:
        """How many conversations are held or waited for right now."""
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def lock(self, key: ConversationKey) -> AsyncIterator[None]:
        entry = self._entries.get(key) or self._entries.setdefault(key, _Entry())
        entry.users += 1
        try:
            await self._acquire(entry.lock, key)
            try:
                yield
            finally:
                entry.lock.release()
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[key]

    async def _acquire(self, lock: asyncio.Lock, key: ConversationKey) -> None:
        if self._wait_s is None:
            await lock.acquire()
            return
        try:
            async with asyncio.timeout(self._wait_s):
                await lock.acquire()
        except TimeoutError:
            raise LockTimeout(key, self._wait_s) from None


class RedisLocks(ConversationLocks):
    """A Redis lock per conversation, shared by every process using the same Redis and prefix.

    `timeout_s` bounds how long a lock lives if its holder dies; `wait_s` how long to wait. If
    Redis cannot be reached, a warning is logged and only the in-process lock is held, so the bot
    keeps answering (serialized within each process) until Redis is back.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        keys: RedisKeyBuilder | None = None,
        timeout_s: float = 300.0,
        wait_s: float = 300.0,
        poll_s: float = 0.02,
        owns_redis: bool = False,
    ) -> None:
        self._redis = redis
        self._keys = keys or RedisKeyBuilder()
        self._timeout_s = timeout_s
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._owns_redis = owns_redis
        self._local = InProcessLocks(wait_s)
        self._in_outage = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLocks:
        return cls(redis_client(url), owns_redis=True, **options)

    @contextlib.asynccontextmanager
    async def lock(self, key: ConversationKey) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self._local.lock(key):
            remaining = max(self._wait_s - (loop.time() - started), 0.0)
            held = await self._acquire(key, remaining)
            try:
                yield
            finally:
                if held is not None:
                    await self._release(key, held)

    def _redis_lock(self, key: ConversationKey) -> RedisLock:
        return self._redis.lock(
            self._keys.lock(key), timeout=self._timeout_s, sleep=self._poll_s, thread_local=False
        )

    async def _acquire(self, key: ConversationKey, wait_s: float) -> RedisLock | None:
        """The held Redis lock, or None when Redis is unreachable (in-process lock only)."""
        lock = self._redis_lock(key)
        token = secrets.token_hex(16)
        try:
            acquired = await lock.acquire(blocking_timeout=wait_s, token=token)
        except asyncio.CancelledError:
            await self._forget_token(lock, token)
            raise
        except REDIS_ERRORS as error:
            self._warn_unavailable(error)
            await self._forget_token(lock, token)
            return None
        if not acquired:
            raise LockTimeout(key, self._wait_s)
        if self._in_outage:
            self._in_outage = False
            log.info("%s is reachable again; conversation locks are shared again", self._where)
        return lock

    @staticmethod
    async def _forget_token(lock: RedisLock, token: str) -> None:
        """Best effort: the lock may have been set just before the reply was lost."""
        with contextlib.suppress(*REDIS_ERRORS):
            await lock.do_release(token.encode())

    async def _release(self, key: ConversationKey, lock: RedisLock) -> None:
        try:
            await lock.release()
        except LockNotOwnedError:
            log.warning(
                "the lock of %s expired after %g s while held (raise KOBOT_LOCK_TIMEOUT_S)",
                key.as_id(),
                self._timeout_s,
            )
        except REDIS_ERRORS as error:
            log.warning(
                "could not release the lock of %s (%s); it expires by itself",
                key.as_id(),
                describe_redis_error(error),
            )

    @property
    def _where(self) -> str:
        return describe_client(self._redis)

    def _warn_unavailable(self, error: BaseException) -> None:
        if not self._in_outage:
            self._in_outage = True
            log.warning(
                "%s is unavailable for conversation locks (%s); "
                "serializing within this process only until it is back",
                self._where,
                describe_redis_error(error),
            )

    async def close(self) -> None:
        if self._owns_redis:
            await self._redis.aclose()


def build_locks(
    settings: Settings, *, redis_keys: RedisKeyBuilder | None = None
) -> ConversationLocks:
    """Redis locks when `redis_url` is set (several workers), otherwise in-process locks."""
    if settings.redis_url:
        return RedisLocks.from_url(
            settings.redis_url,
            keys=redis_keys,
            timeout_s=settings.lock_timeout_s,
            wait_s=settings.lock_timeout_s,
        )
    return InProcessLocks(settings.lock_timeout_s)
