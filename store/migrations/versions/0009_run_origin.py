"""Run origin: runs launched outside batchlab's workers (issue 14, part 2).

``origin`` is ``worker`` for every existing run (queued on the broker, trained by a
batchlab worker) and ``external`` for a run a client registered itself
(``POST /api/external/runs``: ``batchlab train --server``, a notebook's
``Client.start_run``). The reaper never re-queues an external run: no broker message
exists for it (``worker.recovery.reap_external`` fails it once its client is silent).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A plain ADD COLUMN with a server default: no batch copy on SQLite, existing runs
    # read "worker".
    op.add_column(
        "runs",
        sa.Column("origin", sa.String(16), nullable=False, server_default="worker"),
    )


def downgrade() -> None:
    op.drop_column("runs", "origin")
