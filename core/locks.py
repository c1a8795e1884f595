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
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, LockNotOwnedError

from core.messages import ConversationKey
from core.ops.logs import UserIds
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
        super().__init__(f"the conversation is still busy after {waited_s:g} s")
        self.key = key
        self.waited_s = waited_s


class LeaseLost(Exception):
    """The holder no longer owns the conversation's lock (its lease ran out, or Redis was
    flushed or restarted): what it computed under the lock must not be stored."""


class Lease:
    """What a holder gets from `lock()`: `confirm()` right before storing a turn."""

    async def confirm(self) -> None:
        """Raise `LeaseLost` unless the lock is still ours (and will stay so for a while)."""


class ConversationLocks(abc.ABC):
    """`async with locks.lock(key) as lease:` holds the conversation for one turn."""

    @abc.abstractmethod
    def lock(self, key: ConversationKey) -> AbstractAsyncContextManager[Lease]:
        """Wait for the conversation (raising `LockTimeout` after the wait limit) and hold it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


@dataclass(slots=True)
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0  # holders and waiters; the entry is dropped when it reaches zero


LOCAL_LEASE = Lease()  # an in-process lock cannot be lost while its holder runs


class InProcessLocks(ConversationLocks):
    """One `asyncio.Lock` per conversation in use; entries vanish when nobody holds or waits."""

    def __init__(self, wait_s: float | None = 300.0) -> None:
        self._wait_s = wait_s
        self._entries: dict[ConversationKey, _Entry] = {}

    def __len__(self) -> int:
        """How many conversations are held or waited for right now."""
        return len(self._entries)

    @contextlib.asynccontextmanager
    async def lock(self, key: ConversationKey) -> AsyncIterator[Lease]:
        entry = self._entries.get(key) or self._entries.setdefault(key, _Entry())
        entry.users += 1
        try:
            await self._acquire(entry.lock, key)
            try:
                yield LOCAL_LEASE
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


class RedisLease(Lease):
    """A held Redis lock: renewed every third of its lease while the turn runs.

    A renewal that finds the key gone or someone else's token marks the lease lost; `confirm`
    then raises, and it renews once more otherwise, so a confirmed holder owns the lock for at
    least a full lease (far longer than the SQL write that follows).
    """

    def __init__(self, lock: RedisLock, lease_s: float, describe: Callable[[], str]) -> None:
        self._lock = lock
        self._lease_s = lease_s
        self._describe = describe
        self.lost_reason = ""
        self.reported = False

    async def renew(self) -> bool:
        """Extend the lease to a full `lease_s`; False once it is lost (a Redis error is not a
        loss yet: the lease may still run, the next renewal tries again)."""
        if self.lost_reason:
            return False
        try:
            await self._lock.reacquire()
        except LockNotOwnedError:
            self.lost_reason = "it expired or Redis was flushed or restarted"
            return False
        except LockError:
            self.lost_reason = "it was released"
            return False
        return True

    async def keep_renewed(self) -> None:
        """Renew every third of the lease until cancelled or lost."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                if not await self.renew():
                    self.report()
                    return
            except REDIS_ERRORS as error:
                log.warning(
                    "could not renew the lock of %s (%s); retrying",
                    self._describe(),
                    describe_redis_error(error),
                )

    def report(self) -> None:
        """One warning per lost lease, naming what happened (never a misleading timeout)."""
        if not self.reported:
            self.reported = True
            log.warning("lost the lock of %s: %s", self._describe(), self.lost_reason)

    async def confirm(self) -> None:
        try:
            owned = await self.renew()
        except REDIS_ERRORS as error:
            reason = f"Redis could not confirm the lock ({describe_redis_error(error)})"
            raise LeaseLost(reason) from None
        if not owned:
            raise LeaseLost(self.lost_reason)


class RedisLocks(ConversationLocks):
    """A Redis lock per conversation, shared by every process using the same Redis and prefix.

    The lock is a lease of `lease_s` that its holder renews while the turn runs, so the lock of
    a crashed holder is free again within one lease; `wait_s` (separately) bounds how long to
    wait for a busy conversation. If Redis cannot be reached, a warning is logged and only the
    in-process lock is held, so the bot keeps answering (serialized within each process) until
    Redis is back.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        keys: RedisKeyBuilder | None = None,
        lease_s: float = 15.0,
        wait_s: float = 300.0,
        poll_s: float = 0.02,
        owns_redis: bool = False,
        ids: UserIds | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys or RedisKeyBuilder()
        self._lease_s = lease_s
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._owns_redis = owns_redis
        self._ids = ids or UserIds()
        self._local = InProcessLocks(wait_s)
        self._in_outage = False

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisLocks:
        return cls(redis_client(url), owns_redis=True, **options)

    @contextlib.asynccontextmanager
    async def lock(self, key: ConversationKey) -> AsyncIterator[Lease]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self._local.lock(key):
            remaining = max(self._wait_s - (loop.time() - started), 0.0)
            held = await self._acquire(key, remaining)
            if held is None:
                yield LOCAL_LEASE
                return
            async with self._renewed(key, held) as lease:
                yield lease

    @contextlib.asynccontextmanager
    async def _renewed(self, key: ConversationKey, lock: RedisLock) -> AsyncIterator[RedisLease]:
        lease = RedisLease(lock, self._lease_s, lambda: self._ids.conversation(key))
        renewing = asyncio.create_task(lease.keep_renewed())
        try:
            yield lease
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await self._release(key, lock, lease)

    def _redis_lock(self, key: ConversationKey) -> RedisLock:
        return self._redis.lock(
            self._keys.lock(key), timeout=self._lease_s, sleep=self._poll_s, thread_local=False
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

    async def _release(self, key: ConversationKey, lock: RedisLock, lease: RedisLease) -> None:
        try:
            await lock.release()
        except LockNotOwnedError:
            lease.lost_reason = lease.lost_reason or "it expired or Redis was flushed or restarted"
            lease.report()
        except REDIS_ERRORS as error:
            log.warning(
                "could not release the lock of %s (%s); its lease ends within %g s",
                self._ids.conversation(key),
                describe_redis_error(error),
                self._lease_s,
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
            lease_s=settings.lock_lease_s,
            wait_s=settings.lock_timeout_s,
            ids=UserIds.from_settings(settings),
        )
    return InProcessLocks(settings.lock_timeout_s)
