"""Fixtures for the operations tests: the shared PostgreSQL and Redis (tests/support/services)."""

from __future__ import annotations

from tests.support.services import pg_schema, redis_prefix  # noqa: F401 - fixtures
