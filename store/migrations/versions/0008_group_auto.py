"""Auto sweeps: a group's ladder state and the message that explains it.

``auto_state`` is null for every existing group (a sweep of listed batch sizes);
an ``"auto"`` sweep starts ``waiting`` for its baseline and becomes ``queued`` (the ladder
around the baseline's noise scale) or ``failed`` once (``store.runs.settle_auto``).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain nullable ADD COLUMNs: no batch copy on SQLite, existing groups read null.
    op.add_column("groups", sa.Column("auto_state", sa.String(16), nullable=True))
    op.add_column("groups", sa.Column("auto_message", sa.Text(), nullable=True))


def downgrade() -> None:
    for column in ("auto_message", "auto_state"):
        op.drop_column("groups", column)
