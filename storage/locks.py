"""One turn at a time per conversation: the lock contract, and locks within one process.

`ConversationLocks.lock(key)` holds a conversation for one turn and yields a `Lease`, which the
holder confirms right before it stores the turn. `InProcessLocks` serializes the coroutines of
one process; `storage.redis.locks.RedisLocks` serializes several processes that share a Redis.
Different conversations never wait for each other.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from core.messages import ConversationKey


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
