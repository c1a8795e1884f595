"""Linked accounts: pending `/link` codes (by digest) and the accounts of each person.

Revision ID: 0003_linked_accounts
Revises: 0002_inbox_outbox
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_linked_accounts"
down_revision: str | None = "0002_inbox_outbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "link_codes",
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("platform", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("digest", name=op.f("pk_link_codes")),
    )
    op.create_index(op.f("ix_link_codes_platform_user_id"), "link_codes", ["platform", "user_id"])
    op.create_index(op.f("ix_link_codes_expires_at"), "link_codes", ["expires_at"])
    op.create_table(
        "person_accounts",
        sa.Column("platform", sa.String(), nullable=False),
        sa.Column("user_id", sa.String(), nullable=False),
        sa.Column("person_id", sa.String(), nullable=False),
        sa.Column("linked_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "user_id", name=op.f("pk_person_accounts")),
    )
    op.create_index(op.f("ix_person_accounts_person_id"), "person_accounts", ["person_id"])


def downgrade() -> None:
    op.drop_table("person_accounts")
    op.drop_table("link_codes")
