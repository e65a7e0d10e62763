"""SQLite back-end: a batch is one ``executemany`` of the upsert; a series is read from the
cursor straight into numpy."""

from __future__ import annotations

import itertools

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.metrics.rows import COLUMN_DTYPES, COLUMNS, ON_CONFLICT, Row, RunGone, raw_transaction

_UPSERT = f"INSERT INTO metric_points ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) {ON_CONFLICT}"


def write_rows(engine: Engine, run_id: int, rows: list[Row]) -> None:
    """Upsert ``rows`` in one transaction; RunGone if the run no longer exists."""
    with raw_transaction(engine) as raw:
        cur = raw.cursor()
        try:
            # IMMEDIATE: take the write lock (waiting up to the busy timeout) before the
            # check, so no delete can slip in between the check and the insert.
            cur.execute("BEGIN IMMEDIATE")
            if cur.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise RunGone(run_id)
            cur.executemany(_UPSERT, rows)
        finally:
            cur.close()


def fetch_after(conn: sa.Connection, run_id: int, key: str, after: int) -> dict[str, np.ndarray]:
    """Columns of the points of (run, key) with step > after, in step order."""
    cur = conn.connection.dbapi_connection.cursor()
    try:
        cur.execute(
            "SELECT step, epoch, wall_time, value FROM metric_points "
            "WHERE run_id = ? AND key = ? AND step > ? ORDER BY step",
            (run_id, key, after),
        )
        # Straight from the cursor into one array: no list of a million row tuples.
        flat = np.fromiter(itertools.chain.from_iterable(cur), dtype=object)
    finally:
        cur.close()
    # float64 turns a NULL value (SQLite's NaN) into NaN; steps stay exact below 2**53.
    table = flat.astype(np.float64).reshape(-1, 4)
    return {
        name: np.ascontiguousarray(table[:, i]).astype(dtype, copy=False)
        for i, (name, dtype) in enumerate(COLUMN_DTYPES.items())
    }
