"""Durable storage in SQL: SQLite via aiosqlite (the embedded default) or PostgreSQL via asyncpg.

The schema is owned by the Alembic migrations in `storage/migrations/`; `SqlStorage.create` runs
`upgrade head` at start-up. Every driver failure surfaces as `StorageError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import alembic.util
import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy import (
    BigInteger,
    Connection,
    CursorResult,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import AsyncAdaptedQueuePool
from sqlalchemy.types import TypeDecorator

from core.messages import ConversationKey, Role, Turn, utc_now
from storage.base import (
    Account,
    Delivery,
    DeliveryRecord,
    InboxItem,
    LinkCode,
    Storage,
    StorageError,
    StoredReply,
    UserExport,
    mask_url_password,
)
from storage.memory import to_utc

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
SQLITE_BUSY_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 10.0
DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    SQLAlchemyError,
    OSError,  # includes ConnectionError and TimeoutError
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    alembic.util.CommandError,
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite keeps them as naive UTC text."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = to_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else to_utc(value)


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ConversationRow(Base):
    """One context (`ConversationKey`); `context_start_turn_id` is the boundary set by `clear`."""

    __tablename__ = "conversations"
    __table_args__ = (Index(None, "platform", "user_id"),)

    id: Mapped[str] = mapped_column(String, primary_key=True)
    platform: Mapped[str] = mapped_column(String)
    chat_id: Mapped[str] = mapped_column(String)
    user_id: Mapped[str] = mapped_column(String)
    persona: Mapped[str | None] = mapped_column(Text)
    context_start_turn_id: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class TurnRow(Base):
    """One line of a conversation; the id (never reused, even on SQLite) gives the order."""

    __tablename__ = "turns"
    __table_args__ = (
        Index(None, "conversation_id", "id"),
        Index(None, "conversation_id", "message_id"),
        Index(None, "platform", "user_id"),
        Index(None, "created_at"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    conversation_id: Mapped[str] = mapped_column(
        String, ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform: Mapped[str] = mapped_column(String)
    role: Mapped[str] = mapped_column(String(16))
    text: Mapped[str] = mapped_column(Text)
    user_id: Mapped[str] = mapped_column(String)
    message_id: Mapped[str] = mapped_column(String, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    delivery: Mapped[str | None] = mapped_column(String(16))  # AI turns: the outbox state
    sent_ids: Mapped[str | None] = mapped_column(Text)  # the platform's ids, comma-separated


class InboxRow(Base):
    """One received update or message, stored before the platform is told it arrived."""

    __tablename__ = "inbox"
    __table_args__ = (
        Index(None, "platform", "item_id", unique=True),
        Index(None, "platform", "done_at", "id"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    platform: Mapped[str] = mapped_column(String)
    item_id: Mapped[str] = mapped_column(String)
    lane: Mapped[str] = mapped_column(String)
    payload: Mapped[str] = mapped_column(Text)
    note: Mapped[str] = mapped_column(Text, default="")
    added_at: Mapped[datetime] = mapped_column(UTCDateTime)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class LinkCodeRow(Base):
    """A pending `/link` code of one account, by the SHA-256 digest of the code."""

    __tablename__ = "link_codes"
    __table_args__ = (Index(None, "platform", "user_id"), Index(None, "expires_at"))

    digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    platform: Mapped[str] = mapped_column(String)
    user_id: Mapped[str] = mapped_column(String)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class PersonAccountRow(Base):
    """One account linked to a person: the accounts of one person share a conversation."""

    __tablename__ = "person_accounts"
    __table_args__ = (Index(None, "person_id"),)

    platform: Mapped[str] = mapped_column(String, primary_key=True)
    user_id: Mapped[str] = mapped_column(String, primary_key=True)
    person_id: Mapped[str] = mapped_column(String)
    linked_at: Mapped[datetime] = mapped_column(UTCDateTime)


CONVERSATIONS = cast(Table, ConversationRow.__table__)
TURNS = cast(Table, TurnRow.__table__)
INBOX = cast(Table, InboxRow.__table__)
LINK_CODES = cast(Table, LinkCodeRow.__table__)
PERSON_ACCOUNTS = cast(Table, PersonAccountRow.__table__)


# --- errors -----------------------------------------------------------------------------------


def describe_error(error: BaseException) -> str:
    """One short line naming the driver error, with any URL password masked."""
    cause = getattr(error, "orig", None) or error
    if isinstance(cause.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError):
        cause = cause.__cause__  # the asyncpg error SQLAlchemy's adapter wrapped
    lines = str(cause).strip().splitlines()
    message = f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__
    return mask_url_password(message)[:300]


@contextlib.contextmanager
def driver_errors(action: str) -> Iterator[None]:
    """Turn any driver exception raised inside into `StorageError`."""
    try:
        yield
    except DRIVER_ERRORS as error:
        raise StorageError(f"{action} failed: {describe_error(error)}") from error


def describe_database(url: str | URL) -> str:
    """Where a URL points, without credentials: `PostgreSQL at host:port/db` or `SQLite ...`."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite database {parsed.database or ':memory:'}"
    return f"PostgreSQL at {parsed.host or 'localhost'}:{parsed.port or 5432}/{parsed.database}"


# --- engines ----------------------------------------------------------------------------------


WAL_ATTEMPTS = 20


def _enable_wal(cursor: Any) -> None:
    """Switch a new file to WAL. SQLite answers "database is locked" without waiting on the
    busy timeout when processes opening a fresh file race for that switch; the loser retries
    (briefly, at start-up only) and then finds the file in WAL already."""
    for attempt in range(1, WAL_ATTEMPTS + 1):
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except Exception as error:
            if "locked" not in str(error) or attempt == WAL_ATTEMPTS:
                raise
            time.sleep(0.05 * attempt)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets readers and a writer from several processes share the file."""
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, see `_sqlite_on_begin`
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    _enable_wal(cursor)
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _sqlite_on_begin(connection: Connection) -> None:
    """Take the write lock up front, so that the busy timeout applies instead of a deadlock."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _make_sqlite_parent(url: URL) -> None:
    database = url.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pool(url: URL) -> dict[str, Any]:
    """An in-memory database lives in one connection: hand it to one session at a time."""
    if url.database in (None, "", ":memory:") or "mode=memory" in str(url):
        return {"poolclass": AsyncAdaptedQueuePool, "pool_size": 1, "max_overflow": 0}
    return {}


def create_engine_for(url: str, connect_args: Mapping[str, Any] | None = None) -> AsyncEngine:
    """An async engine for SQLite (WAL, busy timeout, foreign keys) or PostgreSQL."""
    try:
        parsed = make_url(url)
    except ArgumentError as error:
        raise StorageError(f"invalid database URL {mask_url_password(url)!r}") from error
    extra = dict(connect_args or {})
    if parsed.get_backend_name() == "sqlite":
        _make_sqlite_parent(parsed)
        engine = create_async_engine(
            parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, **extra}, **_sqlite_pool(parsed)
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    return create_async_engine(
        parsed, pool_pre_ping=True, connect_args={"timeout": CONNECT_TIMEOUT_S, **extra}
    )


# --- migrations -------------------------------------------------------------------------------


_migration_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _migration_lock() -> asyncio.Lock:
    """Alembic keeps the running migration in module globals: one at a time per event loop."""
    return _migration_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config built in code (no alembic.ini): the script location, optionally a URL."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _upgrade_head(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def _lock_migrations(connection: AsyncConnection) -> None:
    """Serialize concurrent start-ups on PostgreSQL (SQLite's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        key = text(
            "SELECT pg_advisory_xact_lock(hashtext('kobot-migrations:' || current_schema()))"
        )
        await connection.execute(key)


async def migrate(engine: AsyncEngine) -> None:
    """Connect, then run `upgrade head` in one transaction; errors name what failed and where."""
    async with _migration_lock():
        await _migrate(engine, describe_database(engine.url))


async def _migrate(engine: AsyncEngine, where: str) -> None:
    try:
        connection = await engine.connect()
    except DRIVER_ERRORS as error:
        raise StorageError(f"cannot connect to {where} ({describe_error(error)})") from error
    try:
        async with connection.begin():
            await _lock_migrations(connection)
            await connection.run_sync(_upgrade_head)
    except DRIVER_ERRORS as error:
        message = f"cannot upgrade the schema of {where} ({describe_error(error)})"
        raise StorageError(message) from error
    finally:
        await connection.close()


async def upgrade_database(url: str, connect_args: Mapping[str, Any] | None = None) -> None:
    """`kobot db upgrade`: bring the database at `url` to the newest schema."""
    engine = create_engine_for(url, connect_args)
    try:
        await migrate(engine)
    finally:
        await engine.dispose()


# --- storage ----------------------------------------------------------------------------------


def _to_turn(row: TurnRow) -> Turn:
    return Turn(Role(row.role), row.text, row.user_id, row.created_at, row.message_id)


def _turn_values(
    key: ConversationKey, turn: Turn, delivery: Delivery | None = None
) -> dict[str, Any]:
    return {
        "delivery": str(delivery) if delivery is not None and turn.role is Role.AI else None,
        "conversation_id": key.as_id(),
        "platform": key.platform,
        "role": str(turn.role),
        "text": turn.text,
        "user_id": turn.user_id,
        "message_id": turn.message_id,
        "created_at": turn.created_at,
    }


def _inbox_values(item: InboxItem, now: datetime) -> dict[str, Any]:
    return {
        "platform": item.platform,
        "item_id": item.item_id,
        "lane": item.lane,
        "payload": item.payload,
        "note": item.note,
        "added_at": now,
    }


def _unseen(items: Sequence[InboxItem], seen: set[tuple[str, str]]) -> list[InboxItem]:
    """The items not in `seen`, each once, in the given order."""
    new: list[InboxItem] = []
    for item in items:
        if (item.platform, item.item_id) not in seen:
            seen.add((item.platform, item.item_id))
            new.append(item)
    return new


_NO_SYNC = {"synchronize_session": False}  # bulk DELETEs: no ORM objects to keep in sync


def _rowcount(result: Any) -> int:
    return max(cast(CursorResult[Any], result).rowcount, 0)


def retried_values(message_id: str) -> dict[str, Any]:
    """What a `/retry` with `message_id` sets on the reply beside its text (see `Storage`)."""
    if not message_id:
        return {}
    return {"message_id": message_id, "delivery": str(Delivery.PENDING), "sent_ids": None}


class SqlStorage(Storage):
    """The source of truth. Build it with `await SqlStorage.create(url)`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)

    @classmethod
    async def create(
        cls, url: str, *, connect_args: Mapping[str, Any] | None = None, upgrade: bool = True
    ) -> SqlStorage:
        """Open the database at `url` and (by default) upgrade its schema to the newest."""
        engine = create_engine_for(url, connect_args)
        try:
            if upgrade:
                await migrate(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine)

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @contextlib.asynccontextmanager
    async def _transaction(self, action: str) -> AsyncIterator[AsyncSession]:
        with driver_errors(action):
            async with self._sessions.begin() as session:
                yield session

    def _upsert_conversation(self, key: ConversationKey, **changes: Any) -> Any:
        """INSERT the conversation row if missing; with `changes`, also update them if present."""
        values = {
            "id": key.as_id(),
            "platform": key.platform,
            "chat_id": key.chat_id,
            "user_id": key.user_id,
            "created_at": utc_now(),
            **changes,
        }
        table = CONVERSATIONS
        if self._engine.dialect.name == "sqlite":
            lite = sqlite_insert(table).values(values)
            if not changes:
                return lite.on_conflict_do_nothing(index_elements=["id"])
            return lite.on_conflict_do_update(
                index_elements=["id"], set_={name: lite.excluded[name] for name in changes}
            )
        pg = postgresql_insert(table).values(values)
        if not changes:
            return pg.on_conflict_do_nothing(index_elements=["id"])
        return pg.on_conflict_do_update(
            index_elements=["id"], set_={name: pg.excluded[name] for name in changes}
        )

    async def append(
        self, key: ConversationKey, turns: Sequence[Turn], delivery: Delivery | None = None
    ) -> None:
        if not turns:
            return
        async with self._transaction("storing turns") as session:
            await session.execute(self._upsert_conversation(key))
            for turn in turns:  # one INSERT each, so the ids follow the given order
                await session.execute(TURNS.insert().values(_turn_values(key, turn, delivery)))

    async def recent(self, key: ConversationKey, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        boundary = (
            select(ConversationRow.context_start_turn_id)
            .where(ConversationRow.id == key.as_id())
            .scalar_subquery()
        )
        query = (
            select(TurnRow)
            .where(TurnRow.conversation_id == key.as_id(), TurnRow.id > func.coalesce(boundary, 0))
            .order_by(TurnRow.id.desc())
            .limit(limit)
        )
        async with self._transaction("reading recent turns") as session:
            rows = (await session.scalars(query)).all()
        return [_to_turn(row) for row in reversed(rows)]

    @staticmethod
    def _reply_id(key: ConversationKey, message_id: str) -> Any:
        """The id of the AI turn a `/retry` with `message_id` made, else of the first turn
        after the newest user turn with `message_id`."""
        retried = SqlStorage._newest_id(key, Role.AI, message_id)
        return func.coalesce(retried, SqlStorage._answer_id(key, message_id))

    @staticmethod
    def _newest_id(key: ConversationKey, role: Role, message_id: str) -> Any:
        """The id of the conversation's newest `role` turn with `message_id`."""
        return (
            select(func.max(TurnRow.id))
            .where(
                TurnRow.conversation_id == key.as_id(),
                TurnRow.role == str(role),
                TurnRow.message_id == message_id,
            )
            .scalar_subquery()
        )

    @staticmethod
    def _answer_id(key: ConversationKey, message_id: str) -> Any:
        """The id of the first turn after the newest user turn with `message_id`."""
        asked = SqlStorage._newest_id(key, Role.USER, message_id)
        return (
            select(func.min(TurnRow.id))
            .where(TurnRow.conversation_id == key.as_id(), TurnRow.id > asked)
            .scalar_subquery()
        )

    async def _reply_row(self, key: ConversationKey, message_id: str) -> TurnRow | None:
        if not message_id:
            return None
        query = select(TurnRow).where(TurnRow.id == self._reply_id(key, message_id))
        async with self._transaction("looking up a reply") as session:
            row = (await session.scalars(query)).first()
        return row if row is not None and row.role == str(Role.AI) else None

    async def find_reply(self, key: ConversationKey, message_id: str) -> Turn | None:
        row = await self._reply_row(key, message_id)
        return None if row is None else _to_turn(row)

    async def reply_to(self, key: ConversationKey, message_id: str) -> StoredReply | None:
        row = await self._reply_row(key, message_id)
        if row is None:
            return None
        sent_ids = tuple(row.sent_ids.split(",")) if row.sent_ids else ()
        return StoredReply(row.text, Delivery(row.delivery or Delivery.SENT), sent_ids)

    async def set_delivery(self, key: ConversationKey, record: DeliveryRecord) -> bool:
        if not record.message_id:
            return False
        reply_id = self._reply_id(key, record.message_id)
        query = (
            update(TurnRow)
            .where(TurnRow.id == reply_id, TurnRow.role == str(Role.AI))
            .values(delivery=str(record.delivery), sent_ids=",".join(record.sent_ids) or None)
        )
        async with self._transaction("recording a delivery") as session:
            return _rowcount(await session.execute(query, execution_options=_NO_SYNC)) > 0

    # --- the inbox ------------------------------------------------------------------------

    def _insert_new(self, values: list[dict[str, Any]]) -> Any:
        if self._engine.dialect.name == "sqlite":
            return sqlite_insert(INBOX).values(values).on_conflict_do_nothing()
        return postgresql_insert(INBOX).values(values).on_conflict_do_nothing()

    async def inbox_add(self, items: Sequence[InboxItem]) -> list[InboxItem]:
        if not items:
            return []
        by_platform: dict[str, set[str]] = {}
        for item in items:
            by_platform.setdefault(item.platform, set()).add(item.item_id)
        known = or_(
            *(
                (InboxRow.platform == platform) & InboxRow.item_id.in_(ids)
                for platform, ids in by_platform.items()
            )
        )
        async with self._transaction("storing received updates") as session:
            seen = {
                (platform, item_id)
                for platform, item_id in (
                    await session.execute(select(InboxRow.platform, InboxRow.item_id).where(known))
                ).all()
            }
            new = _unseen(items, seen)
            if new:
                now = utc_now()
                values = [_inbox_values(item, now) for item in new]
                await session.execute(self._insert_new(values))
        return new

    async def inbox_pending(self, platform: str) -> list[InboxItem]:
        query = (
            select(InboxRow)
            .where(InboxRow.platform == platform, InboxRow.done_at.is_(None))
            .order_by(InboxRow.id)
        )
        async with self._transaction("reading unfinished updates") as session:
            rows = (await session.scalars(query)).all()
        return [
            InboxItem(row.platform, row.item_id, row.lane, row.payload, row.note) for row in rows
        ]

    async def inbox_note(self, platform: str, item_id: str, note: str) -> None:
        query = (
            update(InboxRow)
            .where(InboxRow.platform == platform, InboxRow.item_id == item_id)
            .values(note=note)
        )
        async with self._transaction("noting progress on an update") as session:
            await session.execute(query, execution_options=_NO_SYNC)

    async def inbox_done(self, platform: str, item_id: str) -> None:
        query = (
            update(InboxRow)
            .where(InboxRow.platform == platform, InboxRow.item_id == item_id)
            .values(done_at=utc_now())
        )
        async with self._transaction("finishing an update") as session:
            await session.execute(query, execution_options=_NO_SYNC)

    async def inbox_prune(self, before: datetime) -> int:
        query = delete(InboxRow).where(
            InboxRow.done_at.is_not(None), InboxRow.added_at < to_utc(before)
        )
        async with self._transaction("pruning finished updates") as session:
            return _rowcount(await session.execute(query, execution_options=_NO_SYNC))

    async def replace_last_reply(
        self, key: ConversationKey, text: str, message_id: str = ""
    ) -> bool:
        boundary = (
            select(ConversationRow.context_start_turn_id)
            .where(ConversationRow.id == key.as_id())
            .scalar_subquery()
        )
        newest = (
            select(func.max(TurnRow.id))
            .where(TurnRow.conversation_id == key.as_id(), TurnRow.id > func.coalesce(boundary, 0))
            .scalar_subquery()
        )
        query = (
            update(TurnRow)
            .where(TurnRow.id == newest, TurnRow.role == str(Role.AI))
            .values(text=text, **retried_values(message_id))
        )
        async with self._transaction("replacing a reply") as session:
            return _rowcount(await session.execute(query, execution_options=_NO_SYNC)) > 0

    async def clear(self, key: ConversationKey) -> None:
        newest = select(func.coalesce(func.max(TurnRow.id), 0)).where(
            TurnRow.conversation_id == key.as_id()
        )
        async with self._transaction("clearing the context") as session:
            boundary = (await session.execute(newest)).scalar_one()
            await session.execute(self._upsert_conversation(key, context_start_turn_id=boundary))

    async def delete_user(self, platform: str, user_id: str) -> int:
        owned = select(ConversationRow.id).where(
            ConversationRow.platform == platform, ConversationRow.user_id == user_id
        )
        turns = delete(TurnRow).where(
            or_(
                (TurnRow.platform == platform) & (TurnRow.user_id == user_id),
                TurnRow.conversation_id.in_(owned),
            )
        )
        conversations = delete(ConversationRow).where(
            ConversationRow.platform == platform, ConversationRow.user_id == user_id
        )
        async with self._transaction("deleting a user's data") as session:
            deleted = _rowcount(await session.execute(turns, execution_options=_NO_SYNC))
            await session.execute(conversations, execution_options=_NO_SYNC)
        return deleted

    async def export_user(self, platform: str, user_id: str) -> UserExport:
        turns = (
            select(TurnRow)
            .where(TurnRow.platform == platform, TurnRow.user_id == user_id)
            .order_by(TurnRow.id)
        )
        personas = select(ConversationRow.id, ConversationRow.persona).where(
            ConversationRow.platform == platform,
            ConversationRow.user_id == user_id,
            ConversationRow.persona.is_not(None),
        )
        export = UserExport(platform, user_id)
        async with self._transaction("exporting a user's data") as session:
            for row in (await session.scalars(turns)).all():
                export.conversations.setdefault(row.conversation_id, []).append(_to_turn(row))
            for conversation_id, persona in (await session.execute(personas)).all():
                if persona is not None:
                    export.personas[conversation_id] = persona
        return export

    async def get_persona(self, key: ConversationKey) -> str | None:
        query = select(ConversationRow.persona).where(ConversationRow.id == key.as_id())
        async with self._transaction("reading a persona") as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def set_persona(self, key: ConversationKey, persona: str | None) -> None:
        async with self._transaction("storing a persona") as session:
            await session.execute(self._upsert_conversation(key, persona=persona))

    # --- linked accounts --------------------------------------------------------------------

    async def link_code_put(self, code: LinkCode) -> None:
        account = code.account
        stale = delete(LinkCodeRow).where(
            or_(
                (LinkCodeRow.platform == account.platform)
                & (LinkCodeRow.user_id == account.user_id),
                LinkCodeRow.expires_at <= utc_now(),
            )
        )
        values = {
            "digest": code.digest,
            "platform": account.platform,
            "user_id": account.user_id,
            "expires_at": code.expires_at,
        }
        async with self._transaction("storing a link code") as session:
            await session.execute(stale, execution_options=_NO_SYNC)
            await session.execute(LINK_CODES.insert().values(values))

    async def link_code_take(self, digest: str, now: datetime) -> Account | None:
        query = select(LinkCodeRow).where(LinkCodeRow.digest == digest)
        taken = delete(LinkCodeRow).where(LinkCodeRow.digest == digest)
        async with self._transaction("taking a link code") as session:
            row = (await session.scalars(query)).first()
            if row is None:
                return None
            if _rowcount(await session.execute(taken, execution_options=_NO_SYNC)) != 1:
                return None  # another process took it first
            return Account(row.platform, row.user_id) if row.expires_at > to_utc(now) else None

    @staticmethod
    def _is_account(account: Account) -> Any:
        return (PersonAccountRow.platform == account.platform) & (
            PersonAccountRow.user_id == account.user_id
        )

    async def person_of(self, account: Account) -> str | None:
        query = select(PersonAccountRow.person_id).where(self._is_account(account))
        async with self._transaction("reading a linked account") as session:
            return (await session.execute(query)).scalar_one_or_none()

    async def accounts_of(self, person_id: str) -> list[Account]:
        query = select(PersonAccountRow.platform, PersonAccountRow.user_id).where(
            PersonAccountRow.person_id == person_id
        )
        async with self._transaction("reading linked accounts") as session:
            rows = (await session.execute(query)).all()
        return sorted(Account(platform, user_id) for platform, user_id in rows)

    async def link(self, person_id: str, accounts: Sequence[Account]) -> None:
        if not accounts:
            return
        now = utc_now()
        earlier = delete(PersonAccountRow).where(or_(*map(self._is_account, accounts)))
        rows = [
            {"platform": a.platform, "user_id": a.user_id, "person_id": person_id, "linked_at": now}
            for a in accounts
        ]
        async with self._transaction("linking accounts") as session:
            await session.execute(earlier, execution_options=_NO_SYNC)
            await session.execute(PERSON_ACCOUNTS.insert().values(rows))

    async def unlink(self, account: Account) -> bool:
        query = delete(PersonAccountRow).where(self._is_account(account))
        async with self._transaction("unlinking an account") as session:
            return _rowcount(await session.execute(query, execution_options=_NO_SYNC)) > 0

    async def purge_before(self, cutoff: datetime) -> int:
        query = delete(TurnRow).where(TurnRow.created_at < to_utc(cutoff))
        async with self._transaction("purging old turns") as session:
            return _rowcount(await session.execute(query, execution_options=_NO_SYNC))

    async def stats(self) -> dict[str, int]:
        users = select(TurnRow.platform, TurnRow.user_id).distinct().subquery()
        queries = {
            "turns": select(func.count()).select_from(TurnRow),
            "users": select(func.count()).select_from(users),
            "conversations": select(func.count()).select_from(ConversationRow),
        }
        async with self._transaction("counting") as session:
            return {name: (await session.execute(q)).scalar_one() for name, q in queries.items()}

    async def ping(self) -> str:
        """`SELECT 1` on a connection of the pool; the dialect's name (`sqlite`, `postgresql`)."""
        with driver_errors("pinging the database"):
            async with self._engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        return str(self._engine.dialect.name)

    async def close(self) -> None:
        with driver_errors("closing the database"):
            await self._engine.dispose()
