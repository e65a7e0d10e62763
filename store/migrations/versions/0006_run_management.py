"""Run management: tags, notes, archive flag and the run a run extends.

``tags`` is a JSON list of strings (``[]`` for existing runs), ``notes`` free text
(``""``), ``archived`` hides a run from the default lists, ``parent_id`` names the run
whose checkpoint a "train N more epochs" run resumed from. ``parent_id`` has no foreign
key, like ``metric_points.run_id``: ``store.runs.delete_run`` clears it, and SQLite
cannot add one without copying the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Run ids are BIGINT on PostgreSQL (0004); SQLite's INTEGER is 64-bit already.
_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # Plain ADD COLUMNs with server defaults (see 0003: no batch copy on SQLite); the
    # defaults fill the existing rows.
    op.add_column("runs", sa.Column("tags", sa.JSON(), nullable=False, server_default="[]"))
    op.add_column("runs", sa.Column("notes", sa.Text(), nullable=False, server_default=""))
    op.add_column(
        "runs", sa.Column("archived", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.add_column("runs", sa.Column("parent_id", _BIG_ID, nullable=True))
    op.create_index("ix_runs_archived", "runs", ["archived"])
    op.create_index("ix_runs_parent_id", "runs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_runs_parent_id", table_name="runs")
    op.drop_index("ix_runs_archived", table_name="runs")
    for column in ("parent_id", "archived", "notes", "tags"):
        op.drop_column("runs", column)
