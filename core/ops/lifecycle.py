"""How a bot process starts and stops, the same for Telegram, Discord and the console.

`BotServices` runs beside an adapter: the signal handlers, the health/metrics server and the
retention purge. Graceful shutdown (SIGTERM from `docker stop`, or Ctrl-C):

1. The first SIGTERM/SIGINT sets `services.stop`: `/healthz` turns 503 ("stopping"), the adapter
   stops taking messages and waits for the replies in flight, at most KOBOT_SHUTDOWN_TIMEOUT_S.
   A reply that finishes is sent and stored; one still running at the bound is cancelled before
   it is stored (the turn is stored in one transaction after generation, so it is never half).
2. The retention task stops, then the adapter closes the manager: model, storage, locks.
3. A second signal exits at once (`os._exit`), whatever is still running.

Signals that arrive while the model is still loading stop the process once loading returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING

from core.ops.health import PlatformProbe
from core.ops.retention import RetentionPurge, stop_task
from core.ops.server import OpsServer
from core.settings import Settings

if TYPE_CHECKING:
    from core.dialogue.manager import DialogueManager

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Shutdown:
    """The first SIGINT/SIGTERM sets `requested`; a second one exits the process at once."""

    def __init__(
        self,
        requested: asyncio.Event | None = None,
        exit_now: Callable[[int], None] = os._exit,
    ) -> None:
        self.requested = requested or asyncio.Event()
        self._exit_now = exit_now
        self._installed: list[signal.Signals] = []

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.on_signal, signum)
                self._installed.append(signum)

    def remove(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._installed:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signum)
        self._installed.clear()

    @contextlib.contextmanager
    def interrupts_to(self, callback: Callable[[], object]) -> Iterator[None]:
        """Inside the block SIGINT calls `callback` instead of stopping the process (a terminal
        chat's Ctrl-C stops the reply being generated); SIGTERM still stops. Afterwards SIGINT
        is handled as before."""
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, callback)
        except (NotImplementedError, RuntimeError, ValueError):
            yield  # no signal handlers here (not the main thread, or Windows)
            return
        try:
            yield
        finally:
            if signal.SIGINT in self._installed:
                loop.add_signal_handler(signal.SIGINT, self.on_signal, signal.SIGINT)
            else:
                loop.remove_signal_handler(signal.SIGINT)

    def on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("%s again: exiting now, without waiting for replies in flight", name)
            with contextlib.suppress(Exception):
                sys.stderr.flush()
                sys.stdout.flush()
            self._exit_now(128 + signum)
            return
        log.info("%s: stopping; finishing replies in flight (send it again to exit now)", name)
        self.requested.set()


class BotServices:
    """Signals, the health/metrics server and retention for one bot process (the adapters run
    inside it through `bots.base.run_adapter`): `attach(manager, adapter)` once the manager is
    ready (health "ok", retention starts), `detach()` before the manager closes.

    Pass `stop` to control shutdown yourself (tests): no signal handlers are installed then.
    """

    def __init__(
        self,
        settings: Settings,
        platform: str,
        stop: asyncio.Event | None = None,
        *,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.shutdown = Shutdown(stop)
        self._own_signals = stop is None
        self.ops = OpsServer(
            settings, platform, port=metrics_port, stopping=self.shutdown.requested
        )
        self._retention: asyncio.Task[None] | None = None

    @property
    def stop(self) -> asyncio.Event:
        return self.shutdown.requested

    @property
    def grace_s(self) -> float:
        return self.settings.shutdown_timeout_s

    async def __aenter__(self) -> BotServices:
        if self._own_signals:
            self.shutdown.install()
        try:
            await self.ops.start()
        except BaseException:
            self.shutdown.remove()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            await self.detach()
            await self.ops.stop()
        finally:
            if self._own_signals:
                self.shutdown.remove()

    def attach(self, manager: DialogueManager, probe: PlatformProbe | None = None) -> None:
        """The manager is ready: health reports it, and the retention purge starts."""
        self.ops.attach(manager)
        if probe is not None:
            self.ops.attach_platform(probe)
        days = self.settings.history_retention_days
        if days > 0 and self._retention is None:
            purge = RetentionPurge(
                manager.storage,
                days,
                self.settings.history_purge_interval_s,
                on_purged=self.ops.purged.inc,
            )
            self._retention = asyncio.create_task(purge.run(), name="kobot-retention")

    def attach_platform(self, probe: PlatformProbe) -> None:
        self.ops.attach_platform(probe)

    async def detach(self) -> None:
        """Before the manager closes: stop the retention task (health says "stopping")."""
        self.stop.set()
        await stop_task(self._retention)
        self._retention = None
