"""A metric point as the writer, the back-ends and the readers all spell it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Engine

# What the writer queues and a back-end writes: (run_id, key, step, epoch, wall_time, value).
Row = tuple[int, str, int, float, float, float]
COLUMNS = "run_id, key, step, epoch, wall_time, value"
# Idempotent writes: a (run, key, step) written again keeps the last value.
ON_CONFLICT = (
    "ON CONFLICT (run_id, key, step) DO UPDATE SET "
    "epoch = excluded.epoch, wall_time = excluded.wall_time, value = excluded.value"
)
# A series read back: one numpy column each, in step order.
COLUMN_DTYPES = {"step": "i8", "epoch": "f8", "wall_time": "f8", "value": "f8"}


class RunGone(Exception):
    """The run of a batch no longer exists (deleted while it trained).

    Each write takes the run row's lock before inserting (the per-batch stand-in for a
    foreign key, see store.models.MetricPoint) and raises this if the row is missing.
    """


@contextmanager
def raw_transaction(engine: Engine) -> Iterator[Any]:
    """A pooled DBAPI connection for one transaction: committed, or rolled back on error."""
    raw = engine.raw_connection()
    try:
        yield raw
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()
