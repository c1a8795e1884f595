"""SQL specifics: migrations, SQLite file sharing, and driver errors turned into StorageError."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, inspect, text

from core.messages import ConversationKey
from storage.base import Delivery, StorageError, StoredReply
from storage.sql import Base, SqlStorage, alembic_config, create_engine_for, upgrade_database
from tests.support.services import PostgresSchema, asyncpg_dsn, closed_port
from tests.support.storage import ai, database, sqlite_url, texts, user

KEY = ConversationKey("telegram", "c1", "u1")
HEAD = "0003_linked_accounts"


def _schema_report(connection: Connection) -> dict[str, Any]:
    inspector = inspect(connection)
    return {
        "tables": sorted(inspector.get_table_names()),
        "version": MigrationContext.configure(connection).get_current_revision(),
        "drift": compare_metadata(MigrationContext.configure(connection), Base.metadata),
    }


async def schema_report(url: str, connect_args: dict[str, Any]) -> dict[str, Any]:
    engine = create_engine_for(url, connect_args)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_schema_report)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_upgrade_creates_the_schema_and_a_second_upgrade_changes_nothing(
    kind: str, tmp_path: Path
) -> None:
    async with database(kind, tmp_path) as (url, connect_args):
        await upgrade_database(url, connect_args)
        report = await schema_report(url, connect_args)
        assert report == {
            "tables": [
                "alembic_version",
                "conversations",
                "inbox",
                "link_codes",
                "person_accounts",
                "turns",
            ],
            "version": HEAD,
            "drift": [],  # the models and the migrations describe the same schema
        }
        storage = await SqlStorage.create(url, connect_args=connect_args)  # upgrades again
        await storage.append(KEY, [user("kept"), ai("kept too")])
        await storage.close()

        await upgrade_database(url, connect_args)

        assert await schema_report(url, connect_args) == report
        storage = await SqlStorage.create(url, connect_args=connect_args)
        assert texts(await storage.recent(KEY, 10)) == ["kept", "kept too"]
        await storage.close()


def _upgrade_to(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_upgrading_from_0001_keeps_history_and_counts_old_replies_sent(
    kind: str, tmp_path: Path
) -> None:
    """A deployment from before the outbox: its answered messages are not sent again."""
    async with database(kind, tmp_path) as (url, connect_args):
        engine = create_engine_for(url, connect_args)
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade_to, "0001")
            await connection.execute(
                text(
                    "INSERT INTO conversations (id, platform, chat_id, user_id,"
                    " context_start_turn_id, created_at) VALUES"
                    " ('telegram:c1:u1', 'telegram', 'c1', 'u1', 0, CURRENT_TIMESTAMP)"
                )
            )
            for role, words, message_id in (("user", "옛 질문", "m1"), ("ai", "옛 답", "")):
                await connection.execute(
                    text(
                        "INSERT INTO turns (conversation_id, platform, role, text, user_id,"
                        " message_id, created_at) VALUES ('telegram:c1:u1', 'telegram',"
                        " :role, :words, 'u1', :message_id, CURRENT_TIMESTAMP)"
                    ),
                    {"role": role, "words": words, "message_id": message_id},
                )
        await engine.dispose()

        storage = await SqlStorage.create(url, connect_args=connect_args)
        try:
            assert texts(await storage.recent(KEY, 10)) == ["옛 질문", "옛 답"]
            assert await storage.reply_to(KEY, "m1") == StoredReply("옛 답", Delivery.SENT)
            assert await storage.inbox_pending("telegram") == []
        finally:
            await storage.close()
        assert (await schema_report(url, connect_args))["version"] == HEAD


async def test_a_schema_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path)
    await upgrade_database(url)
    engine = create_engine_for(url)
    async with engine.begin() as connection:
        await connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    await engine.dispose()

    with pytest.raises(StorageError, match=r"cannot upgrade the schema of SQLite database .*f00d"):
        await SqlStorage.create(url)


async def test_concurrent_start_ups_migrate_once(pg_schema: PostgresSchema) -> None:
    """Several workers starting at once against an empty database (advisory lock)."""
    starting = asyncio.gather(
        *(SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args) for _ in range(4))
    )
    storages = await asyncio.wait_for(starting, timeout=30)
    await storages[0].append(KEY, [user("hello")])
    assert texts(await storages[3].recent(KEY, 10)) == ["hello"]
    for storage in storages:
        await storage.close()


async def test_databases_migrate_concurrently_in_one_process(
    pg_schema: PostgresSchema, tmp_path: Path
) -> None:
    """Alembic's module-level state must not be shared by two migrations running at once."""
    starting = asyncio.gather(
        SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args),
        SqlStorage.create(sqlite_url(tmp_path)),
        upgrade_database(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}"),
    )
    first, second, _ = await asyncio.wait_for(starting, timeout=30)
    for storage in (first, second):
        await storage.append(KEY, [user("works")])
        await storage.close()


async def test_alembic_commands_run_without_an_ini_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = sqlite_url(tmp_path)
    config = alembic_config(url)

    await asyncio.to_thread(command.upgrade, config, "head")  # builds its own async engine
    assert (await schema_report(url, {}))["version"] == HEAD

    await asyncio.to_thread(command.upgrade, alembic_config(url), "head", sql=True)
    assert "CREATE TABLE turns" in capsys.readouterr().out


async def test_sqlite_file_is_shared_by_two_engines(tmp_path: Path) -> None:
    """Two engines act like two processes: WAL and a busy timeout, never 'database is locked'."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'new' / 'dir' / 'kobot.db'}"  # directories created
    first, second = await SqlStorage.create(url), await SqlStorage.create(url)

    async def talk(storage: SqlStorage, name: str) -> None:
        own = ConversationKey("telegram", "c1", name)
        for index in range(25):
            await storage.append(KEY, [user(f"{name}{index}", name)])
            await storage.recent(KEY, 5)
            await storage.clear(own)  # reads, then writes

    await asyncio.gather(talk(first, "a"), talk(second, "b"))

    assert len(await first.recent(KEY, 100)) == 50
    assert (await second.stats())["users"] == 2
    async with first.engine.connect() as connection:
        mode = (await connection.execute(text("PRAGMA journal_mode"))).scalar_one()
    assert mode == "wal"
    await first.close()
    await second.close()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
async def test_in_memory_sqlite_serves_concurrent_calls(url: str) -> None:
    storage = await SqlStorage.create(url)
    keys = [ConversationKey("telegram", f"c{n}", "u1") for n in range(5)]

    talking = asyncio.gather(*(storage.append(key, [user("q"), ai("a")]) for key in keys))
    await asyncio.wait_for(talking, timeout=10)

    assert (await storage.stats())["turns"] == 10
    await storage.close()


async def test_connection_failure_names_the_server_not_the_password() -> None:
    url = f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{closed_port()}/test"

    with pytest.raises(StorageError) as caught:
        await SqlStorage.create(url)

    assert str(caught.value).startswith("cannot connect to PostgreSQL at 127.0.0.1:")
    assert "s3cret" not in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


async def test_missing_database_is_reported(pg_schema: PostgresSchema) -> None:
    url = pg_schema.url.rsplit("/", 1)[0] + "/kobot_no_such_database"
    with pytest.raises(StorageError, match='database "kobot_no_such_database" does not exist'):
        await SqlStorage.create(url)


async def test_errors_at_run_time_are_storage_errors(pg_schema: PostgresSchema) -> None:
    storage = await SqlStorage.create(pg_schema.url, connect_args=pg_schema.connect_args)
    await storage.append(KEY, [user("q")])
    admin = await asyncpg.connect(asyncpg_dsn())
    await admin.execute(f'DROP TABLE "{pg_schema.name}".turns')
    await admin.close()

    with pytest.raises(StorageError, match=r"reading recent turns failed: .*turns") as caught:
        await storage.recent(KEY, 10)
    assert caught.value.__cause__ is not None
    with pytest.raises(StorageError, match="storing turns failed"):
        await storage.append(KEY, [user("q")])
    await storage.close()


async def test_invalid_url_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="invalid database URL 'not a url'"):
        await SqlStorage.create("not a url")
