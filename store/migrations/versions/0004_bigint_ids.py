"""Run and group ids are 64-bit on PostgreSQL too.

0001 made them INTEGER, which is 32-bit on PostgreSQL (ids past 2^31 - 1 could not be
stored, and a request naming one failed in the database); SQLite's INTEGER is 64-bit
already, so this changes PostgreSQL only. The id sequences are widened with the columns:
a SERIAL's sequence is ``AS integer`` and would stop at 2^31 - 1 on its own.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, column) of every run or group id, primary and foreign keys alike.
ID_COLUMNS = (
    ("groups", "id"),
    ("runs", "id"),
    ("runs", "group_id"),
    ("runs", "baseline_id"),
    ("metric_points", "run_id"),
    ("series_overviews", "run_id"),
    ("workers", "active_run_id"),
)
SEQUENCES = (("groups", "id"), ("runs", "id"))


def _retype(column_type: str, old: type[sa.types.TypeEngine], new: sa.types.TypeEngine) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in ID_COLUMNS:
        op.alter_column(table, column, type_=new, existing_type=old())
    for table, column in SEQUENCES:
        # Back to integer fails once an id past 2^31 - 1 was handed out, as it must.
        op.execute(f"ALTER SEQUENCE IF EXISTS {table}_{column}_seq AS {column_type}")


def upgrade() -> None:
    _retype("bigint", sa.Integer, sa.BigInteger())


def downgrade() -> None:
    _retype("integer", sa.BigInteger, sa.Integer())
