"""Live series overviews: each series of a running run summarised while its points are
written, so a plot of a running run never has to read every point.

The summary is M4 over fixed-size buckets of consecutive points: each bucket keeps its
first, minimum, maximum and last point, so spikes and the last point survive. Buckets
hold ``width`` points; once there are more than ``MAX_BUCKETS`` of them, neighbours are
merged in pairs and ``width`` doubles. Appending costs O(new points) and a snapshot is at
most ``OVERVIEW_POINTS`` points, whatever the length of the series.

``LiveOverviews`` (one per ``MetricWriter``) feeds each committed batch to the summaries
and, about once a second, stores the changed ones in ``series_overviews`` (the table of
finished runs' overviews, same layout). A reader takes a stored overview plus the points
after its last step (``store.metrics.read``), so it is exact up to the newest point. A
summary starts from the points already stored (a resumed attempt's earlier steps), read
once when it is first stored; points at steps it already summarised (a resumed run
logging the same steps again) are left out of it, like the series cache does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from itertools import chain
from operator import itemgetter

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.metrics.overview import OVERVIEW_POINTS, pack
from store.metrics.queries import fetch_after
from store.metrics.rows import COLUMN_DTYPES, Row

# take(indices) -> the columns of the new points at those indices.
Take = Callable[[np.ndarray], dict[str, np.ndarray]]
MAX_BUCKETS = OVERVIEW_POINTS // 4 - 1  # 4 points a bucket, +1 open bucket: <= OVERVIEW_POINTS
PUBLISH_INTERVAL_S = 1.0

# The run's attempt count is read by the statement itself: a deleted run stores nothing,
# and a transaction that starts with a write takes SQLite's write lock at once. On
# PostgreSQL the run row is key-share locked, as the point writes do, so a concurrent
# delete_run (run row first, then its overviews) cannot leave one behind.
_UPSERT = (
    "INSERT INTO series_overviews (run_id, key, attempts, total, data) "
    "SELECT :r, :k, attempts, :t, :d FROM runs WHERE id = :r{lock} "
    "ON CONFLICT (run_id, key) DO UPDATE SET "
    "attempts = excluded.attempts, total = excluded.total, data = excluded.data"
)


def _m4(values: np.ndarray, width: int) -> np.ndarray:
    """Indices (len // width, 4) of each bucket's first, min, max and last point."""
    nb = len(values) // width
    values = values[: nb * width].reshape(nb, width)
    # A bucket holding NaN keeps its first NaN in the minimum's place, so a plot still
    # shows where a run broke (as store.metrics.downsample does); its maximum stays finite.
    nan = np.isnan(values)
    lo = np.where(nan, np.inf, values).argmin(axis=1)
    lo = np.where(nan.any(axis=1), nan.argmax(axis=1), lo)
    hi = np.where(nan, -np.inf, values).argmax(axis=1)
    base = np.arange(nb) * width
    return np.stack((base, base + lo, base + hi, base + width - 1), axis=1)


def _merge_pairs(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Buckets (2m, 4) -> (m, 4): neighbours merged, extremes kept."""
    left = {name: col[0::2] for name, col in b.items()}
    right = {name: col[1::2] for name, col in b.items()}
    lv, rv = left["value"], right["value"]
    # Left's extreme unless right's is beyond it; a NaN minimum (see _m4) wins, a NaN
    # maximum (a bucket of NaN only) loses.
    take_lo = np.isnan(lv[:, 1]) | ~((rv[:, 1] < lv[:, 1]) | np.isnan(rv[:, 1]))
    take_hi = ~((rv[:, 2] > lv[:, 2]) | np.isnan(lv[:, 2]))
    out = {}
    for name in b:
        lc, rc = left[name], right[name]
        out[name] = np.stack(
            (
                lc[:, 0],
                np.where(take_lo, lc[:, 1], rc[:, 1]),
                np.where(take_hi, lc[:, 2], rc[:, 2]),
                rc[:, 3],
            ),
            axis=1,
        )
    return out


class SeriesSummary:
    """The M4 summary of one growing series (points appended in step order)."""

    def __init__(self) -> None:
        self.width = 1
        self.total = 0
        self.last_step = -1
        self.buckets = {name: np.empty((0, 4), dtype) for name, dtype in COLUMN_DTYPES.items()}
        # Points of the bucket being filled (fewer than ``width`` and up to 4 more), whole.
        self.open = {name: np.empty(0, dtype) for name, dtype in COLUMN_DTYPES.items()}

    def extend(self, cols: Mapping[str, np.ndarray]) -> int:
        """Append points (columns in step order); those at or before ``last_step`` are
        skipped. Returns how many were taken."""
        steps = cols["step"]
        start = int(np.searchsorted(steps, self.last_step, side="right"))
        if start == len(steps):
            return 0
        new = {name: col[start:] for name, col in cols.items()}
        self.append(new["value"], lambda idx: {n: c[idx] for n, c in new.items()}, int(steps[-1]))
        return len(steps) - start

    def append(self, values: np.ndarray, take: Take, last_step: int) -> None:
        """Append points after ``last_step`` given their values; ``take(indices)`` gives
        the columns of those of them that are kept (the writer builds only those)."""
        self.total += len(values)
        self.last_step = last_step
        head = self.open
        # Coarsen first, so a long batch (a series read back whole) is bucketed once.
        while len(self.buckets["step"]) + (len(head["step"]) + len(values)) // self.width > (
            MAX_BUCKETS
        ):
            head = self._coarsen(head)
        n_head = len(head["step"])
        both = np.concatenate((head["value"], values))
        full = len(both) // self.width * self.width

        def gather(idx: np.ndarray) -> dict[str, np.ndarray]:
            flat = idx.ravel()
            old = flat < n_head
            out = {name: np.empty(len(flat), dtype) for name, dtype in COLUMN_DTYPES.items()}
            got = take(flat[~old] - n_head) if not old.all() else None
            for name, col in out.items():
                col[old] = head[name][flat[old]]
                if got is not None:
                    col[~old] = got[name]
            return {name: col.reshape(idx.shape) for name, col in out.items()}

        if full:
            new = gather(_m4(both[:full], self.width))
            self.buckets = {name: np.concatenate((self.buckets[name], new[name])) for name in new}
        self.open = gather(np.arange(full, len(both)))

    def _coarsen(self, pending: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Double the width, merging buckets in pairs. An odd last bucket's four points go
        back in front of the pending ones: a coarser bucket keeps no other of them anyway."""
        nb = len(self.buckets["step"])
        even = nb - nb % 2
        if nb % 2:
            pending = {
                name: np.concatenate((self.buckets[name][-1], pending[name])) for name in pending
            }
        self.buckets = _merge_pairs({name: col[:even] for name, col in self.buckets.items()})
        self.width *= 2
        return pending

    def snapshot(self) -> dict[str, np.ndarray]:
        """The kept points in step order, each once: at most OVERVIEW_POINTS of them."""
        tail = self.open
        if len(tail["step"]) > 4:
            kept = np.sort(_m4(tail["value"], len(tail["step"]))[0])
            tail = {name: col[kept] for name, col in tail.items()}
        order = np.argsort(self.buckets["step"], axis=1, kind="stable")
        cols = {
            name: np.concatenate((np.take_along_axis(col, order, axis=1).ravel(), tail[name]))
            for name, col in self.buckets.items()
        }
        keep = np.ones(len(cols["step"]), dtype=bool)
        keep[1:] = np.diff(cols["step"]) > 0
        return {name: col[keep] for name, col in cols.items()}


_KEY, _VALUE = itemgetter(1), itemgetter(5)


def _point_columns(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    if not rows:
        return {name: np.empty(0, dtype) for name, dtype in COLUMN_DTYPES.items()}
    _, _, step, epoch, wall_time, value = zip(*rows, strict=True)
    return {
        "step": np.array(step, np.int64),
        "epoch": np.array(epoch, np.float64),
        "wall_time": np.array(wall_time, np.float64),
        "value": np.array(value, np.float64),
    }


def _columns(rows: Sequence[Row]) -> dict[str, np.ndarray]:
    """Rows of one key as columns in step order, one point per step (the last one)."""
    cols = _point_columns(rows)
    if len(rows) > 1 and not bool(np.all(np.diff(cols["step"]) > 0)):
        order = np.argsort(cols["step"], kind="stable")
        cols = {name: col[order] for name, col in cols.items()}
        keep = np.ones(len(order), dtype=bool)
        keep[:-1] = np.diff(cols["step"]) > 0  # the last of equal steps wins, as in the table
        cols = {name: col[keep] for name, col in cols.items()}
    return cols


class LiveOverviews:
    """The live overviews of one run's series, fed by its writer (one thread at a time).

    ``feed`` takes each committed batch; ``publish`` stores the summaries that changed
    (called when ``due``: at most every ``interval`` seconds, and when the writer closes).
    A key's summary is made when it is first stored, from every point the table holds
    for it: a fresh run's first second of points, or a resumed attempt's whole series.
    """

    def __init__(self, engine: Engine, run_id: int, interval: float = PUBLISH_INTERVAL_S):
        self.engine = engine
        self.run_id = run_id
        self.interval = interval
        self.summaries: dict[str, SeriesSummary] = {}
        self.changed: set[str] = set()
        self._ids: dict[str, int] = {}
        self._batches: list[Sequence[Row]] = []
        self._ordered = True
        self._last = 0.0

    def feed(self, rows: Sequence[Row], *, ordered: bool = False) -> None:
        """Take a committed batch. ``ordered``: each key's steps grow through it and past
        the batches before (the writer knows; then only kept points become columns)."""
        if rows:
            # Summarised at publish, once a second: numpy's per-call costs are then paid
            # per second, not per batch (a fast writer commits dozens of batches a second).
            self._batches.append(rows)
            self._ordered = self._ordered and ordered

    def _digest(self) -> None:
        batches, ordered = self._batches, self._ordered
        self._batches, self._ordered = [], True
        if not batches:
            return
        rows = batches[0] if len(batches) == 1 else list(chain.from_iterable(batches))
        # Few Python steps per row: this runs on the writer thread, beside the training
        # loop's add() calls.
        keys = list(map(_KEY, rows))
        present = set(keys)
        self.changed |= present
        for key in present - self._ids.keys():
            self._ids[key] = len(self._ids)
        kid = np.fromiter(map(self._ids.__getitem__, keys), np.intp, len(keys))
        values = np.fromiter(map(_VALUE, rows), np.float64, len(rows))
        order = np.argsort(kid, kind="stable")
        counts = np.bincount(kid, minlength=len(self._ids))
        starts = np.cumsum(counts) - counts
        for key in present:
            summary = self.summaries.get(key)
            if summary is None:
                continue  # made from the table when it is first stored
            i = self._ids[key]
            pos = order[starts[i] : starts[i] + counts[i]]
            if ordered and rows[pos[0]][2] > summary.last_step:
                summary.append(
                    values[pos],
                    lambda idx, pos=pos: _point_columns([rows[j] for j in pos[idx].tolist()]),
                    rows[pos[-1]][2],
                )
            else:
                summary.extend(_columns([rows[j] for j in pos.tolist()]))

    def due(self) -> bool:
        return bool(self._batches or self.changed) and (
            time.monotonic() - self._last >= self.interval
        )

    def publish(self) -> int:
        """Store the changed summaries; returns how many."""
        self._digest()
        if not self.changed:
            return 0
        keys = sorted(self.changed)
        new = [key for key in keys if key not in self.summaries]
        if new:
            with self.engine.connect() as conn:
                for key in new:
                    summary = SeriesSummary()
                    summary.extend(fetch_after(conn, self.run_id, key, -1))
                    self.summaries[key] = summary
        params = [
            {
                "r": self.run_id,
                "k": key,
                "t": self.summaries[key].total,
                "d": pack(self.summaries[key].snapshot()),
            }
            for key in keys
        ]
        pg = self.engine.dialect.name == "postgresql"
        upsert = sa.text(_UPSERT.format(lock=" FOR KEY SHARE" if pg else ""))
        with self.engine.begin() as conn:
            conn.execute(upsert, params)
        self.changed.clear()
        self._last = time.monotonic()
        return len(params)
