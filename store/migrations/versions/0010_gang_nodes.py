"""Multi-node runs (issue 14, part 1): the nodes of a run's gang.

``runs.nodes`` is the spec's ``nodes`` (how many workers the run needs at once), kept as a
column so a worker can find the oldest gang that still needs nodes with one query.
``runs.gang_retry_at``: a gang that did not fill in time released its claims and is not
joined again before this time. ``run_nodes`` holds one row per node of an attempt: the
worker that claimed the slot, its host and address, the rendezvous port the first slot
published, its state and last beat (store/gang.py owns every change).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from store.models import BigId, UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("nodes", sa.Integer, nullable=False, server_default="1"))
    op.add_column("runs", sa.Column("gang_retry_at", UTCDateTime(), nullable=True))
    op.create_table(
        "run_nodes",
        sa.Column("run_id", BigId, nullable=False, autoincrement=False),
        sa.Column("attempt", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("slot", sa.Integer, nullable=False, autoincrement=False),
        sa.Column("worker", sa.String(200), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("addr", sa.String(200), nullable=False),
        sa.Column("port", sa.Integer, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("joined_at", UTCDateTime(), nullable=False),
        sa.Column("beat_at", UTCDateTime(), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("run_id", "attempt", "slot", name="pk_run_nodes"),
    )
    op.create_index("ix_run_nodes_worker", "run_nodes", ["worker"])


def downgrade() -> None:
    op.drop_index("ix_run_nodes_worker", table_name="run_nodes")
    op.drop_table("run_nodes")
    op.drop_column("runs", "gang_retry_at")
    op.drop_column("runs", "nodes")
