"""`/healthz` and `/metrics` over real HTTP around a real DialogueManager (tiny model, SQLite),
with real Redis for the Redis check, and the one log event per turn."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from bots.app import build_dialogue_manager
from core.dialogue.manager import DialogueManager
from core.generation.factory import build_backend
from core.ops.logs import JsonFormatter
from core.ops.server import OpsServer
from core.settings import Settings
from tests.support.backends import RecordingBackend
from tests.support.dialogue import make_settings, message
from tests.support.kobot import http_get
from tests.support.prometheus import check_histograms, parse_exposition, sample
from tests.support.services import REDIS_URL, closed_port, require_redis

CANARY = "canary-redis-password-7d1f"


class MeteredBackend(RecordingBackend):
    """A real backend whose `stats()` reports figures of its own."""

    def stats(self) -> dict[str, float]:
        return {"kv_cache_used_bytes": 4096, "batch_size": 2, "steps_total": 7}


@dataclass
class Probe:
    connected: bool = False

    def is_connected(self) -> bool:
        return self.connected


@pytest.fixture
async def manager(tiny_model_dir: Path, tmp_path: Path) -> AsyncIterator[DialogueManager]:
    settings = make_settings(tiny_model_dir, tmp_path)
    built = await build_dialogue_manager(settings, MeteredBackend(build_backend(settings)))
    try:
        yield built
    finally:
        await built.close()


async def started(settings: Settings, platform: str = "test") -> tuple[OpsServer, str]:
    ops = OpsServer(settings, platform, port=0)
    await ops.start()
    return ops, f"http://127.0.0.1:{ops.port}"


async def get_json(url: str) -> tuple[int, dict[str, object]]:
    status, text = await http_get(url)
    return status, json.loads(text)


async def test_healthz_follows_start_up_checks_and_shutdown(manager: DialogueManager) -> None:
    await require_redis()
    settings = manager.settings.model_copy(update={"redis_url": REDIS_URL})
    ops, base = await started(settings)
    try:
        status, body = await get_json(f"{base}/healthz")
        assert (status, body["status"]) == (503, "starting")
        assert body["checks"] == {"model": {"ok": False, "ms": 0.0, "detail": "loading"}}
        assert (await http_get(f"{base}/livez"))[0] == 200
        ops.attach(manager)
        status, body = await get_json(f"{base}/healthz")
        checks = body["checks"]
        assert isinstance(checks, dict)
        assert status == 503 and body["status"] == "failing"
        assert checks["storage"]["ok"] and checks["redis"]["ok"] and checks["model"]["ok"]
        assert not checks["platform"]["ok"]
        probe = Probe(connected=True)
        ops.attach_platform(probe)
        status, body = await get_json(f"{base}/healthz")
        assert (status, body["status"]) == (200, "ok")
        assert "sqlite" in body["checks"]["storage"]["detail"]  # type: ignore[index]
        probe.connected = False
        assert (await get_json(f"{base}/healthz"))[0] == 503
        probe.connected = True
        assert body["checks"]["model"]["detail"].startswith("local ")  # type: ignore[index]
        await manager.backend.close()  # the backend's own health() now says it is closed
        status, body = await get_json(f"{base}/healthz")
        model = body["checks"]["model"]  # type: ignore[index]
        assert status == 503 and not model["ok"] and "closed" in model["detail"]
        ops.stopping.set()
        assert await get_json(f"{base}/healthz") == (
            503,
            {"status": "stopping", "platform": "test"},
        )
    finally:
        await ops.stop()


async def test_an_unreachable_redis_fails_the_check_without_showing_its_password(
    manager: DialogueManager,
) -> None:
    url = f"redis://:{CANARY}@127.0.0.1:{closed_port()}/0"
    ops, base = await started(manager.settings.model_copy(update={"redis_url": url}))
    try:
        ops.attach(manager)
        ops.attach_platform(Probe(connected=True))
        status, text = await http_get(f"{base}/healthz")
        body = json.loads(text)
        assert status == 503 and not body["checks"]["redis"]["ok"]
        assert body["checks"]["storage"]["ok"] and CANARY not in text
    finally:
        await ops.stop()


async def test_metrics_count_turns_by_platform_and_expose_backend_figures(
    manager: DialogueManager,
) -> None:
    ops, base = await started(manager.settings)
    try:
        ops.attach(manager)
        ops.attach_platform(Probe(connected=True))
        await manager.handle(message("안녕하세요"))
        await manager.handle(replace(message("오늘 뭐 해?"), platform="other"))
        await manager.handle(message("/help"))
        await manager.handle(message("x" * 30_000))  # cut to KOBOT_MAX_MESSAGE_CHARS
        status, text = await http_get(f"{base}/metrics")
    finally:
        await ops.stop()
    assert status == 200
    samples, types = parse_exposition(text)
    check_histograms(samples, types)
    assert sample(samples, "kobot_messages_received_total", platform="test") == 3
    assert sample(samples, "kobot_messages_received_total", platform="other") == 1
    assert sample(samples, "kobot_replies_total", platform="test", kind="chat") == 2
    assert sample(samples, "kobot_replies_total", platform="test", kind="command") == 1
    assert sample(samples, "kobot_reply_latency_seconds_count", platform="test", kind="chat") == 2
    assert sample(samples, "kobot_generation_seconds_count") == 3
    assert sample(samples, "kobot_generated_tokens_total") > 0
    assert sample(samples, "kobot_prompt_tokens_total") > 0
    assert sample(samples, "kobot_messages_cut_total") == 1
    assert sample(samples, "kobot_in_flight") == 0
    assert sample(samples, "kobot_model_loaded") == 1
    assert sample(samples, "kobot_platform_connected", platform="test") == 1
    assert sample(samples, "kobot_backend_kv_cache_used_bytes") == 4096
    assert sample(samples, "kobot_backend_batch_size") == 2
    assert types["kobot_backend_steps_total"] == "counter"
    assert types["kobot_errors_total"] == "counter"
    assert not [name for name, _ in samples if name.endswith("_created")]
    totals = manager.observer.totals()  # /stats reads the same counters as /metrics
    assert (totals.messages, totals.replies, totals.commands, totals.trimmed) == (4, 3, 1, 1)
    assert "메시지 4 / 답장 3 / 명령 1 / 오류 0 / 잘린 메시지 1" in await manager.stats_text()


async def test_one_event_per_turn_with_timing_and_hashed_ids(
    manager: DialogueManager, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kobot.turn")
    await manager.handle(message("안녕하세요", user="alice-42", chat="room-9"))
    await manager.handle(message("/about", user="alice-42", chat="room-9"))
    turns = [r for r in caplog.records if r.name == "kobot.turn"]
    assert len(turns) == 2
    chat = JsonFormatter().format(turns[0])
    event = json.loads(chat)
    assert event["event"] == "turn" and event["kind"] == "chat" and event["platform"] == "test"
    assert event["latency_ms"] >= event["generation_ms"] > 0 and event["new_tokens"] >= 1
    assert "alice-42" not in chat and "room-9" not in chat and "안녕하세요" not in chat
    assert event["user"] == manager.observer.user_ids("test", "alice-42") != "alice-42"
    assert json.loads(JsonFormatter().format(turns[1]))["kind"] == "command"


def test_plain_ids_when_the_admin_asks(tiny_model_dir: Path, tmp_path: Path) -> None:
    from core.ops.logs import UserIds

    settings = make_settings(tiny_model_dir, tmp_path, log_user_ids="plain")
    assert UserIds.from_settings(settings)("telegram", "42") == "42"
    salted = make_settings(tiny_model_dir, tmp_path, log_user_salt="s3cret")
    first, second = UserIds.from_settings(salted), UserIds.from_settings(salted)
    assert first("telegram", "42") == second("telegram", "42") != "42"  # stable across workers
