"""A per-user sliding-window rate limit, in memory (bounded)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable


class RateLimiter:
    """Allows at most `per_minute` events per user in any `window_s` window (60 s unless told;
    0 = unlimited)."""

    def __init__(
        self,
        per_minute: int,
        max_users: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 60.0,
    ) -> None:
        self._per_minute = per_minute
        self._window_s = window_s
        self._max_users = max_users
        self._clock = clock
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def allow(self, user: str) -> bool:
        if self._per_minute <= 0:
            return True
        now = self._clock()
        stamps = self._recent.pop(user, None) or deque()
        while stamps and now - stamps[0] >= self._window_s:
            stamps.popleft()
        allowed = len(stamps) < self._per_minute
        if allowed:
            stamps.append(now)
        self._remember(user, stamps)
        return allowed

    def retry_after(self, user: str) -> float:
        stamps = self._recent.get(user)
        if not stamps or len(stamps) < self._per_minute:
            return 0.0
        return max(0.0, self._window_s - (self._clock() - stamps[0]))

    def _remember(self, user: str, stamps: deque[float]) -> None:
        self._recent[user] = stamps
        while len(self._recent) > self._max_users:
            self._recent.popitem(last=False)
