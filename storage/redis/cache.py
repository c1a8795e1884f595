"""A write-through Redis cache in front of a durable `Storage` (SQL, the source of truth).

The keys (window, meta, user index, person) and their layout: `keys.py`. All values are JSON,
all keys have a TTL that every use refreshes.

Correctness rules:

* `recent(limit)` is served from Redis only when the meta hash proves the window holds the newest
  `limit` turns since the last clear: `n` is known and the window holds `n` turns (all of them)
  or at least `limit`. A window evicted or flushed without its meta, or the other way round,
  fails the proof; the turns are read from SQL and the cache is filled again.
* Every write goes to SQL first. Its Redis update runs under WATCH on the meta hash and only if the
  version read *before* the SQL write is unchanged; otherwise the entry is invalidated. Every
  change of an entry sets a fresh random version, so a reader filling the cache from an older
  SQL read never overwrites a newer write, and a write never appends twice.
* A linked account's person is written through (SQL, then SET) and filled with SET NX, so a
  reader filling from an older SQL read never overwrites a newer link or unlink.
* When Redis fails, the call is served by SQL, a warning is logged once per outage (URL password
  masked), Redis is left alone for `retry_after_s`, and every conversation written meanwhile is
  remembered and invalidated before the cache is used again. (Another process that did not see
  the failure keeps its view until the TTL expires; the conversation lock makes that rare.)
"""

from __future__ import annotations

import enum
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from core.messages import ConversationKey, Role, Turn
from storage.base import (
    Account,
    Delivery,
    Storage,
    StorageWrapper,
)
from storage.redis.client import REDIS_ERRORS, RedisLink
from storage.redis.keys import RedisKeyBuilder

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_REMEMBERED_STALE = 100_000


def encode_turn(turn: Turn) -> str:
    data = {
        "role": str(turn.role),
        "text": turn.text,
        "user_id": turn.user_id,
        "created_at": turn.created_at.isoformat(),
        "message_id": turn.message_id,
    }
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def decode_turn(raw: str) -> Turn:
    data = json.loads(raw)
    created_at = datetime.fromisoformat(data["created_at"])
    return Turn(Role(data["role"]), data["text"], data["user_id"], created_at, data["message_id"])


def proves_recent(count: int, cached: int, limit: int) -> bool:
    """Whether a window of `cached` turns, out of `count` since the clear, holds the newest `limit`.

    `count` is exact when it equals `cached`; otherwise it is a lower bound above `cached`.
    """
    return cached <= count and (cached == count or cached >= limit)


class _Unavailable(enum.Enum):
    """Redis could not be used for this call (down, failing, or resting after a failure)."""

    REDIS = "unavailable"


UNAVAILABLE = _Unavailable.REDIS
Version = str | None | _Unavailable
Apply = Callable[[Pipeline, dict[str, str]], None]


class RedisCachedStorage(StorageWrapper):
    """Write-through cache: a hot window per conversation and personas in Redis, SQL behind it."""

    def __init__(
        self,
        inner: Storage,
        link: RedisLink,
        *,
        ttl_s: int = 86400,
        window_turns: int = 80,
        retry_after_s: float = 5.0,
    ) -> None:
        super().__init__(inner)
        self._link = link
        self._redis = link.client
        self._keys = link.keys
        self._ttl_s = ttl_s
        self._window = window_turns
        self._retry_after_s = retry_after_s
        self._resting_until = 0.0
        self._stale: set[str] = set()
        self._stale_accounts: set[Account] = set()
        self._stale_everything = False

    @property
    def keys(self) -> RedisKeyBuilder:
        return self._keys

    # --- health ----------------------------------------------------------------------------

    async def _run(
        self, action: str, work: Callable[[], Awaitable[T]], stale: Iterable[str] = ()
    ) -> T | _Unavailable:
        """Run one Redis step; on failure (or while resting) remember `stale` conversations."""
        if not await self._usable():
            self._remember_stale(stale)
            return UNAVAILABLE
        try:
            result = await work()
        except REDIS_ERRORS as error:
            self._failed(action, error)
            self._remember_stale(stale)
            return UNAVAILABLE
        self._link.answered("the cache is back in use")
        return result

    async def _usable(self) -> bool:
        if time.monotonic() < self._resting_until:
            return False
        if not (self._stale or self._stale_accounts or self._stale_everything):
            return True
        try:
            await self._forget_stale()
        except REDIS_ERRORS as error:
            self._failed("invalidating entries written while it was down", error)
            return False
        return True

    def _failed(self, action: str, error: BaseException) -> None:
        self._resting_until = time.monotonic() + self._retry_after_s
        self._link.lost(action, error, "serving from the database until it is back")

    def _remember_stale(self, conversation_ids: Iterable[str]) -> None:
        self._stale.update(conversation_ids)
        if len(self._stale) > MAX_REMEMBERED_STALE:
            self._stale.clear()
            self._stale_everything = True

    async def _forget_stale(self) -> None:
        if self._stale_accounts:
            accounts = set(self._stale_accounts)
            await self._redis.delete(*(self._keys.person(account) for account in accounts))
            self._stale_accounts -= accounts
        if self._stale_everything:
            self._stale_everything = False
            self._stale.clear()
            try:
                await self._invalidate_everything()
            except BaseException:
                self._stale_everything = True
                raise
            return
        pending = set(self._stale)
        await self._invalidate(pending)
        self._stale -= pending

    # --- invalidation -----------------------------------------------------------------------

    def _queue_invalidate(self, pipe: Pipeline, key: ConversationKey) -> None:
        self._queue_drop(pipe, self._keys.meta(key), self._keys.window(key))

    def _queue_drop(self, pipe: Pipeline, meta: str, *others: str) -> None:
        """Delete the entry but keep a fresh version in its meta hash, to abort in-flight fills."""
        pipe.delete(meta, *others)
        pipe.hset(meta, "v", secrets.token_hex(8))
        pipe.expire(meta, self._ttl_s)

    async def _invalidate(self, conversation_ids: Collection[str]) -> None:
        """Drop the cached window and persona; the new version aborts in-flight fills."""
        if not conversation_ids:
            return
        async with self._redis.pipeline(transaction=True) as pipe:
            for conversation_id in conversation_ids:
                self._queue_invalidate(pipe, ConversationKey.from_id(conversation_id))
            await pipe.execute()

    async def _invalidate_everything(self) -> None:
        """After a long outage or a purge: every window, meta and user index of this prefix."""
        for kind in ("window", "user", "meta", "person"):
            pattern = self._keys.pattern(kind)
            names = [name async for name in self._redis.scan_iter(match=pattern, count=500)]
            for start in range(0, len(names), 500):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name in names[start : start + 500]:
                        if kind == "meta":
                            self._queue_drop(pipe, name)
                        else:
                            pipe.delete(name)
                    await pipe.execute()

    # --- guarded writes ---------------------------------------------------------------------

    async def _version(self, key: ConversationKey) -> Version:
        """The entry's version before a SQL write (None: no entry; UNAVAILABLE: unknown)."""
        result = await self._run(
            "reading a version", lambda: self._redis.hget(self._keys.meta(key), "v")
        )
        return result if isinstance(result, _Unavailable) else _as_text(result)

    async def _after_write(
        self, action: str, key: ConversationKey, before: Version, apply: Apply
    ) -> None:
        """Update the entry after SQL changed, if nobody touched it since `before`; else drop it."""
        conversation_id = key.as_id()
        if isinstance(before, _Unavailable):
            await self._run(action, lambda: self._invalidate([conversation_id]), [conversation_id])
            return
        await self._run(action, lambda: self._checked_update(key, before, apply), [conversation_id])

    async def _checked_update(self, key: ConversationKey, before: str | None, apply: Apply) -> None:
        meta = self._keys.meta(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(meta)
                state = {_text(k): _text(v) for k, v in (await pipe.hgetall(meta)).items()}
                pipe.multi()
                if state.get("v") == before:
                    apply(pipe, state)
                    pipe.hset(meta, "v", secrets.token_hex(8))
                    pipe.expire(meta, self._ttl_s)
                else:
                    self._queue_invalidate(pipe, key)
                await pipe.execute()
        except WatchError:
            await self._invalidate([key.as_id()])

    def _queue_user_index(
        self, pipe: Pipeline, key: ConversationKey, turns: Iterable[Turn]
    ) -> None:
        for user_id in {turn.user_id for turn in turns}:
            index = self._keys.user(key.platform, user_id)
            pipe.sadd(index, key.as_id())
            pipe.expire(index, self._ttl_s)

    # --- Storage ----------------------------------------------------------------------------

    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        """SQL first (with the reply's delivery state, which Redis never caches)."""
        if not turns:
            return
        before = await self._version(key)
        await self._inner.append(key, turns, delivery)

        def push(pipe: Pipeline, state: dict[str, str]) -> None:
            if "n" not in state:
                return  # nothing cached for this conversation: the next read fills it
            window = self._keys.window(key)
            pipe.rpush(window, *[encode_turn(turn) for turn in turns])
            pipe.ltrim(window, -self._window, -1)
            pipe.expire(window, self._ttl_s)
            pipe.hincrby(self._keys.meta(key), "n", len(turns))
            self._queue_user_index(pipe, key, turns)

        await self._after_write("storing turns", key, before, push)

    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        cached = await self._run("reading recent turns", lambda: self._read_window(key, limit))
        if isinstance(cached, _Unavailable):
            return await self._inner.recent(key, limit)
        turns, version = cached
        if turns is not None:
            return turns
        fetch = max(limit, self._window) + 1
        fetched = await self._inner.recent(key, fetch)
        await self._run("filling the cache", lambda: self._fill_window(key, version, fetched))
        return fetched[-limit:]

    async def _read_window(
        self, key: ConversationKey, limit: int
    ) -> tuple[list[Turn] | None, str | None]:
        window, meta = self._keys.window(key), self._keys.meta(key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(meta, ["v", "n"])
            pipe.llen(window)
            pipe.lrange(window, -limit, -1)
            pipe.expire(window, self._ttl_s)
            pipe.expire(meta, self._ttl_s)
            (version, count), cached, items, *_ = await pipe.execute()
        version = _as_text(version)
        if count is None or not proves_recent(int(count), int(cached), limit):
            return None, version
        try:
            return [decode_turn(item) for item in items], version
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cached window for %s", key.as_id())
            return None, version

    async def _fill_window(
        self, key: ConversationKey, version: str | None, fetched: list[Turn]
    ) -> None:
        """Cache the newest turns read from SQL: `n` is exact unless SQL filled the whole fetch."""
        window, meta = self._keys.window(key), self._keys.meta(key)
        kept = fetched[-self._window :]
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(meta)
                if _as_text(await pipe.hget(meta, "v")) != version:
                    return  # changed since we read SQL: leave it to the next reader
                pipe.multi()
                pipe.delete(window)
                if kept:
                    pipe.rpush(window, *[encode_turn(turn) for turn in kept])
                    pipe.expire(window, self._ttl_s)
                pipe.hset(meta, mapping={"v": secrets.token_hex(8), "n": len(fetched)})
                pipe.expire(meta, self._ttl_s)
                self._queue_user_index(pipe, key, kept)
                await pipe.execute()
        except WatchError:
            return

    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        """SQL first; then the cached entry is dropped (the next read fills it from SQL)."""
        replaced = await self._inner.replace_last_reply(key, text, message_id)
        if replaced:
            conversation_id = key.as_id()
            await self._run(
                "replacing a reply",
                lambda: self._invalidate([conversation_id]),
                [conversation_id],
            )
        return replaced

    async def clear(self, key: ConversationKey) -> None:
        before = await self._version(key)
        await self._inner.clear(key)

        def empty(pipe: Pipeline, _state: dict[str, str]) -> None:
            pipe.delete(self._keys.window(key))
            pipe.hset(self._keys.meta(key), "n", 0)

        await self._after_write("clearing the context", key, before, empty)

    async def delete_user(self, platform: str, user_id: str) -> int:
        index = self._keys.user(platform, user_id)
        export = await self._inner.export_user(platform, user_id)
        indexed = await self._run("reading a user index", lambda: self._redis.smembers(index))
        affected = {*export.conversations, *export.personas}
        if not isinstance(indexed, _Unavailable):
            affected.update(str(member) for member in indexed)
        deleted = await self._inner.delete_user(platform, user_id)
        await self._run("forgetting a user", lambda: self._forget_user(index, affected), affected)
        return deleted

    async def _forget_user(self, index: str, conversation_ids: Collection[str]) -> None:
        await self._invalidate(conversation_ids)
        await self._redis.delete(index)

    async def get_persona(self, key: ConversationKey) -> str | None:
        cached = await self._run("reading a persona", lambda: self._read_persona(key))
        if isinstance(cached, _Unavailable):
            return await self._inner.get_persona(key)
        found, persona, version = cached
        if found:
            return persona
        persona = await self._inner.get_persona(key)
        await self._run("caching a persona", lambda: self._fill_persona(key, version, persona))
        return persona

    async def _read_persona(self, key: ConversationKey) -> tuple[bool, str | None, str | None]:
        meta = self._keys.meta(key)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(meta, ["v", "p"])
            pipe.expire(meta, self._ttl_s)
            (version, raw), _ = await pipe.execute()
        if raw is None:
            return False, None, _as_text(version)
        try:
            persona = json.loads(raw)
        except ValueError:
            return False, None, _as_text(version)
        return isinstance(persona, str | None), persona, _as_text(version)

    async def _fill_persona(
        self, key: ConversationKey, version: str | None, persona: str | None
    ) -> None:
        meta = self._keys.meta(key)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                await pipe.watch(meta)
                if _as_text(await pipe.hget(meta, "v")) != version:
                    return
                pipe.multi()
                pipe.hset(meta, "p", json.dumps(persona, ensure_ascii=False))
                pipe.expire(meta, self._ttl_s)
                await pipe.execute()
        except WatchError:
            return

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        before = await self._version(key)
        await self._inner.set_persona(key, persona)

        def store(pipe: Pipeline, _state: dict[str, str]) -> None:
            pipe.hset(self._keys.meta(key), "p", json.dumps(persona, ensure_ascii=False))

        await self._after_write("storing a persona", key, before, store)

    async def person_of(self, account: Account) -> str | None:
        name = self._keys.person(account)
        cached = await self._run("reading a linked account", lambda: self._redis.get(name))
        if isinstance(cached, str | bytes):
            return _text(cached) or None
        person = await self._inner.person_of(account)
        if not isinstance(cached, _Unavailable):
            await self._run("caching a linked account", lambda: self._fill_person(name, person))
        return person

    async def _fill_person(self, name: str, person: str | None) -> None:
        """Only where no write got there first (NX): a link or unlink always wins."""
        await self._redis.set(name, person or "", ex=self._ttl_s, nx=True)

    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        await self._inner.link(person_id, accounts)
        await self._store_people({account: person_id for account in accounts})

    async def unlink(self, account: Account) -> bool:
        unlinked = await self._inner.unlink(account)
        await self._store_people({account: ""})
        return unlinked

    async def _store_people(self, people: dict[Account, str]) -> None:
        """Write the accounts' persons through ("" for none); if Redis cannot take them, their
        entries are dropped before the cache is used again."""

        async def store() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for account, person in people.items():
                    pipe.set(self._keys.person(account), person, ex=self._ttl_s)
                await pipe.execute()

        if isinstance(await self._run("storing linked accounts", store), _Unavailable):
            self._stale_accounts.update(people)

    async def purge_before(self, cutoff: datetime) -> int:
        deleted = await self._inner.purge_before(cutoff)
        if deleted:
            self._stale_everything = True  # cached windows may hold purged turns
            await self._run("invalidating after a purge", _nothing)
        return deleted

    async def ping(self) -> str:
        """The store of record's answer (Redis has a health check of its own)."""
        return await self._inner.ping()

    async def close(self) -> None:
        try:
            await self._inner.close()
        finally:
            await self._link.close()


async def _nothing() -> None:
    """A Redis step that does nothing beyond what `_usable` already did (flush stale entries)."""


def _as_text(value: Any) -> str | None:
    return None if value is None else _text(value)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
