"""The one contract every platform adapter keeps, and the one order a bot process runs in.

`run_adapter(settings, platform)` is `kobot chat`, `kobot telegram` and `kobot discord` alike:

1. `BotServices`: signal handlers and the health/metrics server (`/healthz` says "starting");
2. `platform.connect()`: the configuration and the token are checked (`getMe`, a Discord login)
   before the model loads, so a bad token fails in a second, not after minutes of loading;
3. the dialogue manager (storage, locks, the model, off the event loop);
4. `adapter.start()` (poll, listen, open the gateway, read the terminal), then `adapter.run(stop)`
   until SIGTERM/SIGINT (or `stop`, or the platform ends for good);
5. `adapter.drain(grace_s)`: no new messages; the replies in flight get KOBOT_SHUTDOWN_TIMEOUT_S
   to finish (sent and stored), the rest are cancelled before they are stored; then the
   retention task stops, the manager closes (model, storage, locks), `platform.disconnect()`.

A reply in flight is an `InFlight` task on every platform: a drain waits for them, then cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

from bots.app import build_dialogue_manager
from core.dialogue.manager import DialogueManager
from core.ops.lifecycle import BotServices, Shutdown
from core.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")


class Adapter(Protocol):
    """One platform's side of a running bot; it holds a DialogueManager and translates."""

    async def start(self) -> None:
        """Begin taking messages; returns once they are being taken."""

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set or the platform ends (a failure raises)."""

    async def drain(self, timeout_s: float) -> None:
        """Take no new messages, let those in flight finish within `timeout_s` (cancel the
        rest), then let go of the platform."""

    def is_connected(self) -> bool:
        """For `/healthz`: the platform is connected and messages are being taken."""


class Platform(Protocol):
    """What runs before the model loads (checks, login) and makes the adapter once it has."""

    name: str

    async def connect(self) -> None:
        """Check the configuration and the token; raise StartupError with one clear line."""

    def adapter_for(self, manager: DialogueManager, shutdown: Shutdown) -> Adapter:
        """The adapter over a ready manager; `shutdown` is how this process stops (a terminal
        chat gives Ctrl-C to the reply being generated)."""

    async def disconnect(self) -> None:
        """Let go of what `connect` took (called once, even when `connect` failed)."""


async def run_adapter(
    settings: Settings, platform: Platform, stop: asyncio.Event | None = None
) -> None:
    """Run one bot process (the order in the module docstring). Pass `stop` to stop it
    yourself (tests): no signal handlers are installed then."""
    async with BotServices(settings, platform.name, stop) as services:
        if not services.stop.is_set():
            await run_platform(settings, platform, services.shutdown, services.grace_s, services)


async def run_platform(
    settings: Settings,
    platform: Platform,
    shutdown: Shutdown,
    grace_s: float,
    services: BotServices | None = None,
    manager: DialogueManager | None = None,
) -> None:
    """Steps 2 to 5 of the module docstring; a given `manager` is used and left open."""
    try:
        await platform.connect()
        async with _ready_manager(settings, manager) as ready:
            adapter = platform.adapter_for(ready, shutdown)
            if services is not None:
                services.attach(ready, adapter)
            try:
                await serve(adapter, shutdown.requested, grace_s)
            finally:
                if services is not None:
                    await services.detach()
    finally:
        await platform.disconnect()


async def serve(adapter: Adapter, stop: asyncio.Event, grace_s: float) -> None:
    """Start, run until `stop` (or the platform ends), drain."""
    await adapter.start()
    try:
        await adapter.run(stop)
    finally:
        await adapter.drain(grace_s)


@contextlib.asynccontextmanager
async def _ready_manager(
    settings: Settings, manager: DialogueManager | None
) -> AsyncIterator[DialogueManager]:
    if manager is not None:
        yield manager
        return
    built = await build_dialogue_manager(settings)
    try:
        yield built
    finally:
        await built.close()


class InFlight:
    """The replies being worked on: a drain waits for them (with a bound), then cancels."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def count(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task that a drain waits for."""
        task = asyncio.create_task(work)
        self._add(task)
        return task

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count the current task (one a library started, such as a discord.py event) while
        the block runs."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("InFlight.track() needs a running task")
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)

    def _add(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the work in flight, then cancel the rest; True when
        everything finished in time."""
        tasks = set(self._tasks)
        if not tasks:
            return True
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            log.warning(
                "%d replies did not finish within %g s of the stop; cancelled", len(late), timeout_s
            )
            await asyncio.wait(late)
        return not late


async def done_or_stopped(task: asyncio.Future[Any], stop: asyncio.Event) -> bool:
    """Wait until `task` is done (True) or `stop` is set (False); `task` keeps running."""
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    return task.done()


async def until_stopped(
    work: Awaitable[T], stop: asyncio.Event, timeout_s: float | None = None
) -> T | None:
    """`work`'s result, or None when `stop` is set (or `timeout_s` passes) first; then `work`
    is cancelled."""
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({job, stopper}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job
    return None if job.cancelled() else job.result()
