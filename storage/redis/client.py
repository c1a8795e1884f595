"""The Redis client as kobot's Redis users (the cache, the locks) hold it: a fail-fast client,
its key layout, whether closing it is theirs, and one outage report (a warning when Redis fails,
once per outage, and a note when it answers again). Log lines name Redis by host, never by URL."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from storage.base import mask_url_password
from storage.redis.keys import RedisKeyBuilder

__all__ = ["REDIS_ERRORS", "RedisLink", "describe_client", "describe_redis_error", "redis_client"]

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError)


def redis_client(url: str, *, timeout_s: float = 2.0) -> Redis:
    """A client that fails fast (short timeouts, one retry) so SQL can take over quickly."""
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
    )


def describe_client(redis: Redis) -> str:
    """`Redis at host:port/db` from the client's settings (never its password)."""
    options = redis.connection_pool.connection_kwargs
    if options.get("path"):
        return f"Redis at unix://{options['path']}"
    host, port = options.get("host", "localhost"), options.get("port", 6379)
    return f"Redis at {host}:{port}/{options.get('db', 0)}"


def describe_redis_error(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return mask_url_password(message)[:300]


class RedisLink:
    """One user's hold on a Redis client. `owned`: `close()` closes the client (a client
    shared with others is left open). `in_outage` is True from the failure `lost` reports until
    `answered` is called."""

    def __init__(
        self, client: Redis, keys: RedisKeyBuilder | None = None, *, owned: bool = False
    ) -> None:
        self.client = client
        self.keys = keys or RedisKeyBuilder()
        self.owned = owned
        self.where = describe_client(client)
        self.in_outage = False

    @classmethod
    def open(cls, url: str, keys: RedisKeyBuilder | None = None) -> RedisLink:
        """A fail-fast client of its own on `url`."""
        return cls(redis_client(url), keys, owned=True)

    def lost(self, action: str, error: BaseException, meanwhile: str) -> None:
        """Report a failure while doing `action`, once per outage; `meanwhile` says what the
        user of the link does until Redis is back."""
        if not self.in_outage:
            self.in_outage = True
            error_text = describe_redis_error(error)
            log.warning("%s failed while %s (%s); %s", self.where, action, error_text, meanwhile)

    def answered(self, recovery: str) -> None:
        """Redis answered: end the outage, if there was one, saying what `recovery` restores."""
        if self.in_outage:
            self.in_outage = False
            log.info("%s is reachable again; %s", self.where, recovery)

    async def close(self) -> None:
        if self.owned:
            await self.client.aclose()
