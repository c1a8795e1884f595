"""Fixtures for the operations tests: the shared PostgreSQL and Redis (tests/services.py)."""

from __future__ import annotations

from tests.services import pg_schema, redis_prefix  # noqa: F401 - fixtures
