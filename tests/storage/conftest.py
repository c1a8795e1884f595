"""Fixtures for the storage tests: every backend, and the shared servers (tests/support/)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.base import Storage
from tests.support.services import pg_schema, redis_prefix  # noqa: F401 - fixtures
from tests.support.storage import BACKENDS, open_storage


@pytest.fixture(params=BACKENDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    """The same tests run against every backend (aiogram's test_storages style)."""
    async with open_storage(request.param, tmp_path) as opened:
        yield opened
