"""PostgreSQL back-end: a batch goes in by binary COPY and an optimistic plain INSERT (measured
faster than pipelined executemany and than always using ON CONFLICT; see
docs/benchmarks/store.md); a series comes out as binary arrays that numpy reads in place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.metrics.rows import COLUMN_DTYPES, COLUMNS, ON_CONFLICT, Row, RunGone, raw_transaction

_LOCK_RUN = "SELECT 1 FROM runs WHERE id = %s FOR KEY SHARE"
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS metric_stage (run_id integer, key text, step bigint, "
    "epoch float8, wall_time float8, value float8) ON COMMIT DELETE ROWS"
)
_STAGE_TYPES = ("int4", "text", "int8", "float8", "float8", "float8")
_INSERT_STAGED = f"INSERT INTO metric_points ({COLUMNS}) SELECT {COLUMNS} FROM metric_stage"
MERGE_STAGED = f"{_INSERT_STAGED} {ON_CONFLICT}"


@contextmanager
def locked_run(engine: Engine, run_id: int) -> Iterator[tuple[Any, Any]]:
    """(connection, cursor) of one transaction that holds the run row's key-share lock (a
    delete of the run waits for it); RunGone if the run no longer exists."""
    with raw_transaction(engine) as raw:
        conn = raw.driver_connection
        with conn.cursor() as cur:
            if cur.execute(_LOCK_RUN, (run_id,)).fetchone() is None:
                raise RunGone(run_id)
            yield conn, cur


def stage(cur: Any, rows: list[Row]) -> None:
    """Binary COPY of ``rows`` into the connection's temp table (emptied at commit)."""
    cur.execute(_STAGE)
    with cur.copy("COPY metric_stage FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(_STAGE_TYPES)
        for row in rows:
            copy.write_row(row)


def write_rows(engine: Engine, run_id: int, rows: list[Row]) -> None:
    """Upsert ``rows`` in one transaction; RunGone if the run no longer exists."""
    with locked_run(engine, run_id) as (conn, cur):
        stage(cur, rows)
        # A plain INSERT costs the server ~40% less than ON CONFLICT's speculative
        # insertion, and new points are the rule; a batch that rewrites steps (a
        # resumed run) fails it inside a savepoint and is merged instead.
        if not _insert_new(conn, cur):
            cur.execute(MERGE_STAGED)


def _insert_new(conn: Any, cur: Any) -> bool:
    """Plain INSERT of the staged rows in a savepoint; False if one was already stored."""
    from psycopg.errors import UniqueViolation

    try:
        with conn.transaction():
            cur.execute(_INSERT_STAGED)
    except UniqueViolation:
        return False
    return True


# Each column comes back as one binary array (array_agg), which numpy reads in place:
# row-by-row results (or COPY, one message per row) cost a Python object per value,
# several times the query itself for a long series.
_FETCH = (
    "SELECT array_agg(step), array_agg(epoch), array_agg(wall_time), "
    "array_agg(COALESCE(value, 'NaN'::float8)) FROM (SELECT step, epoch, wall_time, value "
    "FROM metric_points WHERE run_id = %s AND key = %s AND step > %s ORDER BY step) AS t"
)


def fetch_after(conn: sa.Connection, run_id: int, key: str, after: int) -> dict[str, np.ndarray]:
    """Columns of the points of (run, key) with step > after, in step order."""
    from psycopg.postgres import types

    driver = conn.connection.driver_connection
    with driver.cursor(binary=True) as cur:
        for name in ("int8", "float8"):
            cur.adapters.register_loader(types[name].array_oid, _raw_bytes_loader())
        row = cur.execute(_FETCH, (run_id, key, after)).fetchone()
    return {
        name: _binary_array(buf, dtype)
        for (name, dtype), buf in zip(COLUMN_DTYPES.items(), row, strict=True)
    }


def _binary_array(buf: bytes | None, dtype: str) -> np.ndarray:
    """A one-dimensional PostgreSQL binary array without NULLs, as a numpy array.

    Layout: ndim, has-nulls flag, element type (int32 each), then length and lower
    bound per dimension, then per element its byte length (int32) and big-endian value.
    """
    if buf is None or int.from_bytes(buf[0:4], "big") == 0:  # no rows: NULL / empty
        return np.empty(0, dtype)
    n = int.from_bytes(buf[12:16], "big")
    elements = np.frombuffer(buf, dtype=[("len", ">i4"), ("v", ">" + dtype)], count=n, offset=20)
    return elements["v"].astype(dtype)


@cache
def _raw_bytes_loader() -> type:
    from psycopg.adapt import Loader
    from psycopg.pq import Format

    class RawBytes(Loader):
        """Hands a binary array over undecoded (for _binary_array)."""

        format = Format.BINARY

        def load(self, data: Any) -> bytes:
            return bytes(data)

    return RawBytes
