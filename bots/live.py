"""A reply that grows in place on a chat platform: post the first partial, edit in the later ones.

Platform-neutral: an adapter gives `LiveMessage` two coroutines, `post(text) -> handle` and
`edit(handle, text)`, which raise `FloodWait` for a flood limit (Telegram `RetryAfter`, a Discord
429 that discord.py did not absorb) and `EditFailed` when the message cannot be edited any more.

Rules kept here, whatever the platform:
* nothing is posted during the first `first_after_s` (a second by default): a reply that is
  ready by then goes out as one message, without an edit;
* at most one operation on the message per `interval_s` (one edit per second by default),
  counted from the end of the previous one, so even a slow or retried request keeps the gap;
* a flood limit pushes the next operation back by what the platform asked (at least the
  interval); the text sent then is the newest one, never a backlog of stale partials;
* only the newest partial matters: updates arriving faster than edits are coalesced;
* `finish(final)` waits its turn too and then shows exactly `final`; it returns False when
  nothing was posted or the message broke, and the adapter then sends the reply normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from core.messages import Reply

log = logging.getLogger(__name__)

H = TypeVar("H")
Clock = Callable[[], float]
DEFAULT_INTERVAL_S = 1.0
FINISH_ATTEMPTS = 4


class FloodWait(Exception):
    """The platform asked to wait `seconds` before the next request."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"flood control: retry in {seconds:g} s")
        self.seconds = seconds


class EditFailed(Exception):
    """The message cannot be posted or edited (deleted, no permission, refused)."""


def _same(text: str) -> str:
    return text


class LiveMessage(Generic[H]):
    """One streamed reply message (see the module docstring)."""

    def __init__(
        self,
        post: Callable[[str], Awaitable[H]],
        edit: Callable[[H, str], Awaitable[None]],
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        first_after_s: float | None = None,
        fit: Callable[[str], str] = _same,
        clock: Clock = time.monotonic,
    ) -> None:
        self._post = post
        self._edit = edit
        self._interval_s = interval_s
        self._fit = fit
        self._clock = clock
        self._latest = ""
        self._shown: str | None = None
        self._ready_at = clock() + (interval_s if first_after_s is None else first_after_s)
        self._changed = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.handle: H | None = None
        self.broken = False
        self.operations = 0

    @property
    def started(self) -> bool:
        return self.handle is not None

    def update(self, text: str) -> None:
        """A newer partial reply. Synchronous and cheap: the dialogue manager calls it often."""
        if self.broken or self._closing.is_set() or not text.strip():
            return
        self._latest = text
        self._changed.set()
        if self._task is None:
            self._task = asyncio.create_task(self._pump())

    async def finish(self, text: str) -> bool:
        """Stop streaming and show exactly `text` (see the module docstring)."""
        await self.close()
        if self.handle is None or self.broken:
            return False
        for _ in range(FINISH_ATTEMPTS):
            if self._shown == text:
                return True
            await asyncio.sleep(max(0.0, self._ready_at - self._clock()))
            await self._show(text)
            if self.broken:
                return False
        return self._shown == text

    async def close(self) -> None:
        """Stop streaming (an operation under way completes first); no final edit."""
        self._closing.set()
        if self._task is not None:
            await self._task

    async def _pump(self) -> None:
        while await self._next_change():
            if not await self._turn_comes():
                return
            text = self._fit(self._latest)
            if text != self._shown:
                await self._show(text)
            if self.broken:
                return

    async def _next_change(self) -> bool:
        """Wait for a newer partial; False when closing."""
        await _first_of(self._changed.wait(), self._closing.wait())
        self._changed.clear()
        return not self._closing.is_set()

    async def _turn_comes(self) -> bool:
        """Wait until the next operation is allowed; False when closing meanwhile."""
        delay = self._ready_at - self._clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
        return not self._closing.is_set()

    async def _show(self, text: str) -> None:
        """Post or edit once; afterwards the next operation waits at least the interval."""
        try:
            if self.handle is None:
                self.handle = await self._post(text)
            else:
                await self._edit(self.handle, text)
            self._shown = text
            self.operations += 1
            self._ready_at = self._clock() + self._interval_s
        except FloodWait as flood:
            log.info("streamed reply: %s", flood)
            self._ready_at = self._clock() + max(flood.seconds, self._interval_s)
            self._changed.set()  # try the newest text again once the wait is over
        except EditFailed as error:
            log.warning("streamed reply stopped: %s", error)
            self.broken = True
        except Exception:
            log.exception("streamed reply stopped by an unexpected error")
            self.broken = True


async def _first_of(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


async def finish_reply(
    live: LiveMessage[H] | None, reply: Reply, chunks: Sequence[str]
) -> Sequence[str] | None:
    """Make the streamed message the reply's first chunk; the chunks still to send after it.
    None when the reply was not streamed (nothing posted, an attachment, or the message broke):
    the adapter then sends the whole reply as usual."""
    if live is None or not live.started or reply.attachment is not None or not chunks:
        return None
    first, *rest = chunks
    return rest if await live.finish(first) else None


@contextlib.asynccontextmanager
async def streaming(live: LiveMessage[H] | None) -> AsyncIterator[LiveMessage[H] | None]:
    """While the reply is generated: `live` takes the partials; closed afterwards."""
    try:
        yield live
    finally:
        if live is not None:
            await live.close()
