"""Data retention: delete turns older than KOBOT_HISTORY_RETENTION_DAYS, on a schedule.

Every bot process runs the purge once at start and then every KOBOT_HISTORY_PURGE_INTERVAL_S
(with a little jitter, so several workers rarely purge at the same moment; purging twice is
harmless: the DELETE is idempotent). `kobot history purge` runs the same purge by hand.
Conversation rows (personas, context boundaries) stay; `/forget` removes those.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from core.messages import utc_now
from storage.base import Storage, StorageError

log = logging.getLogger(__name__)
JITTER = 0.1


class RetentionPurge:
    """Purges `storage` of turns older than `days` days, once or every `interval_s` seconds."""

    def __init__(
        self,
        storage: Storage,
        days: int,
        interval_s: float = 3600.0,
        *,
        clock: Callable[[], datetime] = utc_now,
        on_purged: Callable[[int], None] | None = None,
    ) -> None:
        if days < 1:
            raise ValueError("retention needs at least one day")
        self.storage = storage
        self.days = days
        self.interval_s = interval_s
        self.clock = clock
        self.on_purged = on_purged
        self.runs = 0

    def cutoff(self) -> datetime:
        return self.clock() - timedelta(days=self.days)

    async def purge_once(self) -> int:
        """Delete what is older than the cutoff now; the number of turns deleted."""
        cutoff = self.cutoff()
        deleted = await self.storage.purge_before(cutoff)
        self.runs += 1
        if self.on_purged is not None:
            self.on_purged(deleted)
        level = logging.INFO if deleted else logging.DEBUG
        log.log(level, "retention: deleted %d turns older than %s", deleted, cutoff.isoformat())
        return deleted

    async def run(self) -> None:
        """Purge now, then on schedule, until cancelled; a failed purge is logged and retried."""
        while True:
            try:
                await self.purge_once()
            except StorageError as error:
                log.warning("retention purge failed (retrying next time): %s", error)
            await asyncio.sleep(self.interval_s * (1 + random.uniform(-JITTER, JITTER)))


async def stop_task(task: asyncio.Task[None] | None) -> None:
    """Cancel a background task and wait for it to end."""
    if task is None or task.done():
        return
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
