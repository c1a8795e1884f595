"""Conversation locks shared by every process that uses the same Redis and key prefix.

Each process first queues on its own in-process lock, so only one of its coroutines polls Redis
per conversation; the Redis lock is a lease its holder renews while the turn runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable

from redis.asyncio.lock import Lock as RedisLock
from redis.exceptions import LockError, LockNotOwnedError

from core.messages import ConversationKey
from storage.locks import (
    LOCAL_LEASE,
    ConversationLocks,
    InProcessLocks,
    Lease,
    LeaseLost,
    LockTimeout,
)
from storage.redis.client import REDIS_ERRORS, RedisLink, describe_redis_error

log = logging.getLogger(__name__)


def _unnamed(key: ConversationKey) -> str:
    return f"a {key.platform} conversation"  # never its ids: the caller passes how to show them


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
        link: RedisLink,
        *,
        lease_s: float = 15.0,
        wait_s: float = 300.0,
        poll_s: float = 0.02,
        describe_key: Callable[[ConversationKey], str] | None = None,
    ) -> None:
        self._link = link
        self._lease_s = lease_s
        self._wait_s = wait_s
        self._poll_s = poll_s
        self._describe_key = describe_key or _unnamed
        self._local = InProcessLocks(wait_s)

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
        lease = RedisLease(lock, self._lease_s, lambda: self._describe_key(key))
        renewing = asyncio.create_task(lease.keep_renewed())
        try:
            yield lease
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await self._release(key, lock, lease)

    def _redis_lock(self, key: ConversationKey) -> RedisLock:
        return self._link.client.lock(
            self._link.keys.lock(key), timeout=self._lease_s, sleep=self._poll_s, thread_local=False
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
            self._link.lost("taking a lock", error, "serializing within this process only")
            await self._forget_token(lock, token)
            return None
        if not acquired:
            raise LockTimeout(key, self._wait_s)
        self._link.answered("conversation locks are shared again")
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
                self._describe_key(key),
                describe_redis_error(error),
                self._lease_s,
            )

    async def close(self) -> None:
        await self._link.close()
