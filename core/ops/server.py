"""What a bot process tells its operators over HTTP: `/healthz`, `/livez`, `/metrics`.

`OpsServer` is a small aiohttp server on KOBOT_METRICS_HOST:KOBOT_METRICS_PORT (0 = off):

* `GET /healthz`: JSON `{"status": ..., "checks": {...}}`: storage (`Storage.ping()`), Redis (PING,
  when KOBOT_REDIS_URL is set), model (loaded), platform (the adapter says it is connected).
  200 when everything passes, 503 while starting, stopping or when a check fails.
* `GET /livez`: 200 while the process serves HTTP at all.
* `GET /metrics`: Prometheus text format (see `core.ops.metrics`); the per-turn figures come
  from the dialogue manager's `TurnObserver` (`core.ops.turns`).

Every key of the backend's `stats()` (KV-cache use, batch size, engine steps...) becomes
`kobot_backend_<key>` (a counter when it ends in `_total`); a backend without figures exposes
nothing extra. `/healthz`'s model check is the backend's own `health()`.
GPU memory is reported when CUDA is already initialised in the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import GaugeMetricFamily, Metric

from core.errors import StartupError
from core.ops.health import CHECK_TIMEOUT_S, Check, PlatformProbe, timed_check
from core.ops.logs import SecretRedactor, settings_secrets
from core.ops.metrics import (
    CONTENT_TYPE,
    LiveFigures,
    MetricSet,
    app_registry,
    backend_figures,
    backend_metrics,
    exposition,
    gauge,
    gpu_metrics,
)
from core.settings import Settings

if TYPE_CHECKING:
    from core.dialogue.manager import DialogueManager

log = logging.getLogger(__name__)


def manager_metrics(manager: DialogueManager) -> list[Metric]:
    """Live figures read at scrape time."""
    depth = gauge(
        "kobot_in_flight",
        "Chat turns in progress (waiting for a lock or generating)",
        manager.stats.in_flight,
    )
    return [depth, *backend_metrics(backend_figures(manager.backend)), *gpu_metrics()]


class OpsServer:
    """`/healthz`, `/livez` and `/metrics` for one bot process (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        platform: str,
        *,
        port: int | None = None,
        stopping: asyncio.Event | None = None,
    ) -> None:
        self.settings = settings
        self.platform = platform
        self.port = settings.metrics_port if port is None else port
        self.enabled = port is not None or settings.metrics_port > 0
        self.stopping = stopping or asyncio.Event()
        self.manager: DialogueManager | None = None
        self.probe: PlatformProbe | None = None
        own = MetricSet()
        self.purged = own.counter(
            "kobot_retention_purged_turns_total", "Turns deleted by KOBOT_HISTORY_RETENTION_DAYS"
        )
        self.registry = app_registry()
        self.registry.register(own)
        self.registry.register(LiveFigures(self._state_metrics))
        self._redactor = SecretRedactor(settings_secrets(settings))
        self._redis: Any = None
        self._runner: web.AppRunner | None = None

    # lifecycle

    async def start(self) -> int | None:
        """Listen (before the model loads, so `/healthz` answers "starting"); the bound port."""
        if not self.enabled:
            return None
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.settings.metrics_host, self.port)
        try:
            await site.start()
        except OSError as error:
            await self._runner.cleanup()
            self._runner = None
            where = f"{self.settings.metrics_host}:{self.port}"
            raise StartupError(f"KOBOT_METRICS_PORT: cannot listen on {where} ({error})") from None
        self.port = int(self._runner.addresses[0][1])
        log.info("health and metrics on http://%s:%d/", self.settings.metrics_host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
            self._redis = None

    def attach(self, manager: DialogueManager) -> None:
        """The manager is ready: its turn metrics join this process's registry."""
        if self.manager is not None:
            self.registry.unregister(self.manager.observer.metrics)
        self.manager = manager
        self.registry.register(manager.observer.metrics)

    def attach_platform(self, probe: PlatformProbe) -> None:
        self.probe = probe

    # health

    async def health(self) -> tuple[int, dict[str, Any]]:
        if self.stopping.is_set():
            return 503, {"status": "stopping", "platform": self.platform}
        if self.manager is None:
            checks = {"model": Check(False, "loading").as_dict()}
            return 503, {"status": "starting", "platform": self.platform, "checks": checks}
        names, probes = zip(*self._checks(self.manager).items(), strict=True)
        results = await asyncio.gather(*(timed_check(p, CHECK_TIMEOUT_S) for p in probes))
        checks = {name: self._shown(result) for name, result in zip(names, results, strict=True)}
        healthy = all(result.ok for result in results)
        body = {"status": "ok" if healthy else "failing", "platform": self.platform}
        return (200 if healthy else 503), {**body, "checks": checks}

    def _checks(self, manager: DialogueManager) -> dict[str, Callable[[], Awaitable[str]]]:
        checks: dict[str, Callable[[], Awaitable[str]]] = {
            "storage": manager.storage.ping,
            "model": lambda: self._model(manager),
            "platform": self._platform,
        }
        if self.settings.redis_url:
            checks["redis"] = self._ping_redis
        return checks

    def _shown(self, check: Check) -> dict[str, Any]:
        shown = check.as_dict()
        if "detail" in shown:
            shown["detail"] = self._redactor.redact(shown["detail"])
        return shown

    async def _model(self, manager: DialogueManager) -> str:
        health = manager.backend.health()
        if not health.ok:
            raise RuntimeError(health.detail)
        return health.detail

    async def _platform(self) -> str:
        if self.probe is None:
            raise RuntimeError("not connected yet")
        if not self.probe.is_connected():
            raise RuntimeError("disconnected")
        return self.platform

    async def _ping_redis(self) -> str:
        from storage.redis.client import describe_client, redis_client

        if self._redis is None:
            assert self.settings.redis_url is not None
            self._redis = redis_client(self.settings.redis_url, timeout_s=CHECK_TIMEOUT_S)
        await self._redis.ping()
        return describe_client(self._redis)

    # metrics

    def metrics_text(self) -> str:
        return exposition(self.registry)

    def _state_metrics(self) -> Iterable[Metric]:
        serving = 1.0 if self.manager is not None and not self.stopping.is_set() else 0.0
        loaded = gauge("kobot_model_loaded", "1 once the model is loaded and serving", serving)
        connected = GaugeMetricFamily(
            "kobot_platform_connected", "1 while the adapter is connected", labels=["platform"]
        )
        connected.add_metric([self.platform], self._connected())
        metrics: list[Metric] = [loaded, connected]
        if self.manager is not None:
            metrics.extend(manager_metrics(self.manager))
        return metrics

    def _connected(self) -> float:
        try:
            return 1.0 if self.probe is not None and self.probe.is_connected() else 0.0
        except Exception:  # a broken probe reads as disconnected
            return 0.0

    # handlers

    async def _healthz(self, request: web.Request) -> web.Response:
        status, body = await self.health()
        return web.json_response(body, status=status)

    async def _livez(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "platform": self.platform})

    async def _metrics(self, request: web.Request) -> web.Response:
        body = self.metrics_text()
        return web.Response(body=body.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})
