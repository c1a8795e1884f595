"""Alembic environment, async-engine aware and configured in code (no alembic.ini).

`storage.sql.migrate` hands over an open connection in `config.attributes["connection"]`
(inside its transaction); otherwise (`alembic` commands run from `storage.sql.alembic_config`)
an async engine is built from the `sqlalchemy.url` option.
"""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy import Connection

from storage.sql import Base, create_engine_for

target_metadata = Base.metadata


def _configure(**options: Any) -> None:
    context.configure(target_metadata=target_metadata, compare_type=True, **options)


def _run_offline() -> None:
    """`alembic upgrade --sql`: print the SQL instead of running it."""
    url = context.config.get_main_option("sqlalchemy.url")
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def _run_with(connection: Connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


async def _run_with_new_engine(url: str) -> None:
    engine = create_engine_for(url)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_run_with)
    finally:
        await engine.dispose()


def _run_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "no connection and no sqlalchemy.url: use storage.sql.alembic_config(url)"
        )
    asyncio.run(_run_with_new_engine(url))


if context.is_offline_mode():
    _run_offline()
else:
    _run_online()
