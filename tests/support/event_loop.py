"""Watching the event loop stay responsive while work runs elsewhere."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass


@dataclass
class Ticks:
    count: int = 0


@asynccontextmanager
async def ticking(interval_s: float = 0.005) -> AsyncIterator[Ticks]:
    """Counts the wake-ups of a task that sleeps `interval_s` at a time, while the block runs."""
    ticks = Ticks()

    async def tick() -> None:
        while True:
            await asyncio.sleep(interval_s)
            ticks.count += 1

    task = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        task.cancel()
