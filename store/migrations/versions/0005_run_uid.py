"""Runs get a never-repeating identity, ``uid``, that names their folder.

Run folders were named by the integer id: after the database was reset (or restored from
an older backup) with ``$BATCHLAB_HOME`` kept, a new run given an old id resumed the old
run's checkpoint. Existing runs are backfilled with ``uid = str(id)``, the name their
folder already has, so their checkpoints stay theirs; new runs get a random UUID.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN and a separate index (see 0003: no batch copy on SQLite).
    op.add_column("runs", sa.Column("uid", sa.String(32), nullable=True))
    runs = sa.table("runs", sa.column("id", sa.BigInteger), sa.column("uid", sa.String))
    op.execute(runs.update().values(uid=sa.cast(runs.c.id, sa.String)))
    op.create_index("ix_runs_uid", "runs", ["uid"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_runs_uid", table_name="runs")
    op.drop_column("runs", "uid")
