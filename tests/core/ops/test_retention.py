"""Retention on SQLite and PostgreSQL (and behind Redis): the purge, its schedule inside a bot
process, and the admin commands `kobot history purge|export|delete|stats` and `kobot db upgrade`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from bots.cli import main as cli_main
from core.messages import ConversationKey, Role, Turn
from core.ops.lifecycle import BotServices
from core.ops.metrics import total
from core.ops.retention import RetentionPurge
from storage.base import Storage
from storage.redis.cache import RedisCachedStorage
from storage.redis.client import RedisLink
from storage.redis.keys import RedisKeyBuilder
from storage.sql import SqlStorage
from tests.support.dialogue import make_settings
from tests.support.kobot import eventually
from tests.support.prometheus import parse_exposition, sample
from tests.support.services import REDIS_URL
from tests.support.storage import database, sqlite_url

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
KEY = ConversationKey("telegram", "100", "7")
OTHER = ConversationKey("discord", "200", "8")


def turn(role: Role, text: str, days_ago: float, user: str = "7") -> Turn:
    return Turn(role, text, user, created_at=NOW - timedelta(days=days_ago))


async def fill(storage: Storage) -> None:
    await storage.append(KEY, [turn(Role.USER, "아주 옛날", 40), turn(Role.AI, "옛 대답", 40)])
    await storage.append(KEY, [turn(Role.USER, "지난주", 7), turn(Role.AI, "최근 대답", 7)])
    await storage.append(OTHER, [turn(Role.USER, "old", 31, "8"), turn(Role.AI, "ok", 31, "8")])
    await storage.set_persona(KEY, "친절한 선생님")


@pytest.fixture(params=["sqlite", "postgres", "redis+postgres"])
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    kind: str = request.param
    async with database(kind.removeprefix("redis+"), tmp_path) as (url, connect_args):
        sql = await SqlStorage.create(url, connect_args=connect_args)
        if not kind.startswith("redis+"):
            yield sql
            await sql.close()
            return
        from tests.support.services import redis_key_prefix

        async with redis_key_prefix() as prefix:
            cached = RedisCachedStorage(sql, RedisLink.open(REDIS_URL, RedisKeyBuilder(prefix)))
            yield cached
            await cached.close()


async def test_purge_deletes_only_turns_older_than_the_retention(storage: Storage) -> None:
    await fill(storage)
    assert (await storage.recent(KEY, 10))[0].text == "아주 옛날"  # warm any cache
    purge = RetentionPurge(storage, days=30, clock=lambda: NOW)
    assert await purge.purge_once() == 4
    assert [t.text for t in await storage.recent(KEY, 10)] == ["지난주", "최근 대답"]
    assert await storage.recent(OTHER, 10) == []
    assert await storage.get_persona(KEY) == "친절한 선생님"  # settings are not history
    assert (await storage.stats())["turns"] == 2
    assert await purge.purge_once() == 0  # idempotent: several workers may purge


async def test_the_schedule_purges_again_every_interval(storage: Storage) -> None:
    purged: list[int] = []
    purge = RetentionPurge(storage, 30, 0.05, clock=lambda: NOW, on_purged=purged.append)
    task = asyncio.create_task(purge.run())
    try:
        await eventually(lambda: bool(purged))  # the purge at start (nothing to delete yet)
        await storage.append(KEY, [turn(Role.USER, "old", 60), turn(Role.AI, "old", 60)])
        await eventually(lambda: sum(purged) >= 2)  # a later, scheduled purge
    finally:
        task.cancel()
    assert purged[0] == 0 and purge.runs >= 2 and await storage.recent(KEY, 10) == []


async def test_bot_processes_run_the_purge_when_retention_is_set(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from bots.app import build_dialogue_manager

    settings = make_settings(
        tiny_model_dir, tmp_path, history_retention_days=30, history_purge_interval_s=1
    )
    manager = await build_dialogue_manager(settings)
    old = Turn(Role.USER, "오래된 말", "7", created_at=datetime.now(UTC) - timedelta(days=45))
    await manager.storage.append(KEY, [old])
    stop = asyncio.Event()
    try:
        async with BotServices(settings, "test", stop, metrics_port=0) as services:
            services.attach(manager)
            await eventually(lambda: total(services.ops.purged) >= 1)
            metrics = services.ops.metrics_text()
    finally:
        await manager.close()
    samples, _ = parse_exposition(metrics)
    assert sample(samples, "kobot_retention_purged_turns_total") == 1


# --- admin commands (in-process `kobot ...`) --------------------------------------------------


@pytest.fixture
async def filled_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KOBOT_DATABASE_URL", sqlite_url(tmp_path))
    storage = await SqlStorage.create(sqlite_url(tmp_path))
    try:
        recent = datetime.now(UTC)
        await storage.append(KEY, [Turn(Role.USER, "안녕", "7", recent), Turn(Role.AI, "네", "7")])
        await storage.append(
            KEY, [Turn(Role.USER, "옛날", "7", recent - timedelta(days=90))]
        )  # out of order in time, as an import would be
    finally:
        await storage.close()
    return tmp_path


async def kobot(*args: str) -> int:
    return await asyncio.to_thread(cli_main, list(args))


async def test_history_stats_export_purge_and_delete(
    filled_sqlite: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await kobot("history", "stats") == 0
    assert json.loads(capsys.readouterr().out) == {
        "turns": 3, "users": 1, "conversations": 1, "retention_days": 0,
    }  # fmt: skip
    assert await kobot("history", "purge") == 2  # nothing to purge by
    assert "KOBOT_HISTORY_RETENTION_DAYS" in capsys.readouterr().err
    assert await kobot("history", "purge", "--days", "30") == 0
    assert "deleted): 1 turns" in capsys.readouterr().out
    out_file = filled_sqlite / "export.json"
    assert await kobot("history", "export", "--user", "telegram:7", "--out", str(out_file)) == 0
    exported = json.loads(out_file.read_text(encoding="utf-8"))
    assert [t["text"] for t in exported["conversations"][KEY.as_id()]] == ["안녕", "네"]
    capsys.readouterr()
    assert await kobot("history", "export", "--user", "telegram:7") == 0
    assert json.loads(capsys.readouterr().out)["user_id"] == "7"
    assert await kobot("history", "export", "--user", "seven") == 2
    assert "PLATFORM:USER_ID" in capsys.readouterr().err
    assert await kobot("history", "delete", "--user", "telegram:7") == 0
    assert await kobot("history", "stats") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["turns"] == 0


async def test_purge_before_a_date(filled_sqlite: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cutoff = (datetime.now(UTC) - timedelta(days=1)).date().isoformat()
    assert await kobot("history", "purge", "--before", cutoff) == 0
    assert "deleted): 1 turns" in capsys.readouterr().out
    assert await kobot("history", "purge", "--before", "last tuesday") == 2


async def test_db_upgrade_creates_and_then_keeps_the_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KOBOT_DATABASE_URL", sqlite_url(tmp_path / "new"))
    assert await kobot("db", "upgrade") == 0
    assert await kobot("db", "upgrade") == 0  # idempotent
    assert capsys.readouterr().out.count("up to date") == 2
    storage = await SqlStorage.create(sqlite_url(tmp_path / "new"), upgrade=False)
    try:
        assert await storage.stats() == {"turns": 0, "users": 0, "conversations": 0}
    finally:
        await storage.close()
