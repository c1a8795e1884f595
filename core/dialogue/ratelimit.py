"""A per-user sliding-window rate limit, in memory (bounded)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class RateLimiter:
    """Allows at most `per_minute` events per user in any `window_s` window (60 s unless told;
    0 = unlimited), remembering the `max_users` most recent users."""

    per_minute: int
    max_users: int = 100_000
    clock: Callable[[], float] = time.monotonic
    window_s: float = 60.0
    _recent: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict, init=False)

    def allow(self, user: str) -> bool:
        if self.per_minute <= 0:
            return True
        now = self.clock()
        stamps = self._recent.pop(user, None) or deque()
        while stamps and now - stamps[0] >= self.window_s:
            stamps.popleft()
        allowed = len(stamps) < self.per_minute
        if allowed:
            stamps.append(now)
        self._remember(user, stamps)
        return allowed

    def retry_after(self, user: str) -> float:
        stamps = self._recent.get(user)
        if not stamps or len(stamps) < self.per_minute:
            return 0.0
        return max(0.0, self.window_s - (self.clock() - stamps[0]))

    def _remember(self, user: str, stamps: deque[float]) -> None:
        self._recent[user] = stamps
        while len(self._recent) > self.max_users:
            self._recent.popitem(last=False)
