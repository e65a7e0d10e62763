"""Full-resolution reads for exports: metric points and runs in bounded chunks.

The downsampled reads (``store.metrics``) answer plots; an export wants every point,
and a run may hold millions. These generators page through the primary key (keyset
pagination: each chunk is one short query resuming after the last row of the previous
one), so an export of any size holds one chunk in memory at a time, and no long-lived
transaction blocks a writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import db
from store.models import MetricPoint, Run

POINT_COLUMNS = ("run_id", "key", "step", "epoch", "wall_time", "value")
CHUNK_ROWS = 5_000
RUN_CHUNK = 500

# (run_id, key, step, epoch, wall_time, value); value None is NaN (SQLite stores NaN as NULL).
PointRow = tuple[int, str, int, float, float, float | None]


def iter_point_chunks(
    engine: Engine, run_ids: Sequence[int], *, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[PointRow]]:
    """Every point of each run (in the order given), ordered by key then step, as lists
    of at most ``chunk_rows`` rows."""
    p = MetricPoint
    cols = (p.run_id, p.key, p.step, p.epoch, p.wall_time, p.value)
    for run_id in run_ids:
        with engine.connect() as conn:
            keys = list(conn.scalars(sa.select(p.key).where(p.run_id == run_id).distinct()))
        for key in sorted(keys):
            after: int | None = None
            while True:
                # A range of the primary key (run_id, key, step): an index seek per chunk.
                q = sa.select(*cols).where(p.run_id == run_id, p.key == key)
                if after is not None:
                    q = q.where(p.step > after)
                with engine.connect() as conn:
                    rows = conn.execute(q.order_by(p.step).limit(chunk_rows)).all()
                if not rows:
                    break
                yield rows  # type: ignore[misc]  # Rows are tuples: no copy
                if len(rows) < chunk_rows:
                    break
                after = rows[-1][2]
                del rows  # not alive with the next chunk: one chunk in memory at a time


def iter_runs(
    engine: Engine, where: Sequence[Any], *, chunk: int = RUN_CHUNK
) -> Iterator[list[Run]]:
    """Runs matching ``where`` (``store.runs.run_filters``), newest first, in chunks
    (their session is closed: read their columns only)."""
    before: int | None = None
    while True:
        q = sa.select(Run).where(*where)
        if before is not None:
            q = q.where(Run.id < before)
        q = q.order_by(Run.id.desc()).limit(chunk)
        with db.session(engine) as s:
            rows = list(s.scalars(q))
        if not rows:
            return
        yield rows
        if len(rows) < chunk:
            return
        before = rows[-1].id
