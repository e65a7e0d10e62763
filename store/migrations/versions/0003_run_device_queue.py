"""Runs record the queue they were sent to and the device they trained on.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD / DROP COLUMN (SQLite >= 3.35 has both): a batch copy of the table would
    # lose SQLite's AUTOINCREMENT on runs.id, which keeps run ids from being reused.
    op.add_column("runs", sa.Column("queue", sa.String(64), nullable=True))
    op.add_column("runs", sa.Column("device", sa.String(300), nullable=True))


def downgrade() -> None:
    op.drop_column("runs", "device")
    op.drop_column("runs", "queue")
