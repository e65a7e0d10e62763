"""The small queries the readers and the overviews share: a run's state, its keys, and a
series' points after a step (through the dialect's back-end)."""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa

from store.metrics import postgres, sqlite

# Distinct keys of a run by skipping through the primary-key index (a loose index scan),
# instead of reading every point: each step finds the next key after the previous one.
_KEYS = sa.text(
    "WITH RECURSIVE k(key) AS ("
    " SELECT MIN(key) FROM metric_points WHERE run_id = :r"
    " UNION ALL"
    " SELECT (SELECT MIN(m.key) FROM metric_points m WHERE m.run_id = :r AND m.key > k.key)"
    " FROM k WHERE k.key IS NOT NULL)"
    " SELECT key FROM k WHERE key IS NOT NULL"
)


def run_keys(conn: sa.Connection, run_id: int) -> list[str]:
    """The metric keys the run has points for, sorted."""
    return [row[0] for row in conn.execute(_KEYS, {"r": run_id})]


def run_state(conn: sa.Connection, run_id: int) -> tuple[int, str] | None:
    """The run's attempt count (its cache token) and status; None: no such run."""
    row = conn.execute(
        sa.text("SELECT attempts, status FROM runs WHERE id = :r"), {"r": run_id}
    ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def fetch_after(conn: sa.Connection, run_id: int, key: str, after: int) -> dict[str, np.ndarray]:
    """Columns of the points of (run, key) with step > after, in step order."""
    backend = postgres if conn.dialect.name == "postgresql" else sqlite
    return backend.fetch_after(conn, run_id, key, after)
