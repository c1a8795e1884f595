"""Pacing sends under Telegram's flood limits.

Telegram asks bots for at most about one message per second in a chat, 20 a minute in a group
and 30 a second overall. Each chat gets a lane: a FIFO lock (so a reply's chunks and successive
replies keep their order) and a token bucket; one more bucket paces the whole bot. A 429
`RetryAfter` is honoured inside the lane (`bots.telegram.delivery`), so everything else for that
chat waits too.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: float


@dataclass(frozen=True, slots=True)
class Pacing:
    """Flood-limit pacing; the defaults follow Telegram's published limits."""

    private: Rate = Rate(1.0, 3.0)
    group: Rate = Rate(20 / 60, 3.0)
    overall: Rate = Rate(30.0, 30.0)
    max_lanes: int = 10_000


class TokenBucket:
    """Reservation-style token bucket: `reserve` takes a token and says how long to wait for it."""

    def __init__(self, rate: Rate, clock: Clock = time.monotonic) -> None:
        self._rate = rate
        self._clock = clock
        self._tokens = rate.burst
        self._updated = clock()

    def reserve(self) -> float:
        self._refill()
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self._rate.per_second

    def _refill(self) -> None:
        now = self._clock()
        gained = (now - self._updated) * self._rate.per_second
        self._tokens = min(self._rate.burst, self._tokens + gained)
        self._updated = now


@dataclass
class Lane:
    bucket: TokenBucket
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ChatPacer:
    """One lane per chat (bounded, least recently used dropped first) and one overall bucket."""

    def __init__(self, pacing: Pacing, clock: Clock = time.monotonic) -> None:
        self._pacing = pacing
        self._clock = clock
        self._overall = TokenBucket(pacing.overall, clock)
        self._lanes: OrderedDict[int, Lane] = OrderedDict()

    @asynccontextmanager
    async def lane(self, chat_id: int, is_group: bool) -> AsyncIterator[Lane]:
        lane = self._lane_for(chat_id, is_group)
        async with lane.lock:
            yield lane

    async def wait_turn(self, lane: Lane) -> None:
        await asyncio.sleep(max(lane.bucket.reserve(), self._overall.reserve()))

    def _lane_for(self, chat_id: int, is_group: bool) -> Lane:
        lane = self._lanes.pop(chat_id, None)
        if lane is None:
            rate = self._pacing.group if is_group else self._pacing.private
            lane = Lane(TokenBucket(rate, self._clock))
        self._lanes[chat_id] = lane
        self._forget_idle_lanes()
        return lane

    def _forget_idle_lanes(self) -> None:
        excess = len(self._lanes) - self._pacing.max_lanes
        if excess <= 0:
            return
        idle = [chat for chat, lane in self._lanes.items() if not lane.lock.locked()]
        for chat in idle[:excess]:
            del self._lanes[chat]
