"""The inbox (received updates, stored before they are confirmed) and the outbox (each reply's
delivery state, kept on its AI turn).

Revision ID: 0002_inbox_outbox
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_inbox_outbox"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("turns") as turns:
        turns.add_column(sa.Column("delivery", sa.String(length=16), nullable=True))
        turns.add_column(sa.Column("sent_ids", sa.Text(), nullable=True))
    op.create_table(
        "inbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("platform", sa.String(), nullable=False),
        sa.Column("item_id", sa.String(), nullable=False),
        sa.Column("lane", sa.String(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inbox")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_inbox_platform_item_id"), "inbox", ["platform", "item_id"], unique=True
    )
    op.create_index(op.f("ix_inbox_platform_done_at_id"), "inbox", ["platform", "done_at", "id"])


def downgrade() -> None:
    op.drop_table("inbox")
    with op.batch_alter_table("turns") as turns:
        turns.drop_column("sent_ids")
        turns.drop_column("delivery")
