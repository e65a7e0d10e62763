"""Metric points: a batched, idempotent writer and downsampled / incremental reads.

Writes go through ``MetricWriter``: ``add()`` only appends to an in-memory queue (the
training loop never waits on the database); a background thread writes the queue every
``flush_interval`` seconds or once ``max_pending`` points wait. Each write is one
transaction with the semantics of ``INSERT ... ON CONFLICT (run_id, key, step) DO
UPDATE``, so a resumed run that logs the same steps again stores every point once, last
value winning.

- SQLite: DBAPI ``executemany`` of the upsert in one transaction.
- PostgreSQL: binary ``COPY`` into a per-connection temp table, then one plain
  ``INSERT ... SELECT``, falling back to ``... ON CONFLICT DO UPDATE`` when the batch
  rewrites stored steps (measured faster than pipelined executemany and than always
  using ON CONFLICT; see docs/benchmarks/store.md).

Reads keep each ``(run, key)`` series as numpy arrays in a process-wide cache extended
with the steps beyond what it holds, so serving a 1M-point series does not refetch it.
The cache of a run is dropped when the run is deleted or starts a new attempt (a
resumed run may rewrite steps it had logged). Non-finite values are stored as they are
(SQLite turns NaN into NULL, read back as NaN) and come out of the read functions as
``None``, ready for JSON.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache, partial
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store.downsample import downsample_indices
from store.models import FINAL_STATUSES, KEY_MAX_LEN

log = logging.getLogger(__name__)

X_COLUMNS = ("step", "epoch", "wall_time")
_COLUMNS = "run_id, key, step, epoch, wall_time, value"
_UPDATE = "epoch = excluded.epoch, wall_time = excluded.wall_time, value = excluded.value"
_SQLITE_UPSERT = (
    f"INSERT INTO metric_points ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
    f"ON CONFLICT (run_id, key, step) DO UPDATE SET {_UPDATE}"
)
_PG_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS metric_stage (run_id integer, key text, step bigint, "
    "epoch float8, wall_time float8, value float8) ON COMMIT DELETE ROWS"
)
_PG_STAGE_TYPES = ("int4", "text", "int8", "float8", "float8", "float8")
_PG_INSERT = f"INSERT INTO metric_points ({_COLUMNS}) SELECT {_COLUMNS} FROM metric_stage"
_PG_MERGE = f"{_PG_INSERT} ON CONFLICT (run_id, key, step) DO UPDATE SET {_UPDATE}"

Row = tuple[int, str, int, float, float, float]


class MetricWriteError(RuntimeError):
    """Points could not be written; they stay queued in the writer."""


# ---------------------------------------------------------------------------------------
# Writing


class MetricWriter:
    """Batches the points of one run into the database from a background thread.

    ``add`` is thread-safe and cheap. A failed background write keeps its points queued,
    logs the error, exposes it as ``last_error`` and retries with backoff (up to
    ``max_retry_delay`` seconds apart). ``flush`` writes synchronously and raises
    ``MetricWriteError`` on failure; ``close`` flushes, retrying for up to
    ``close_timeout`` seconds, and raises if points are still unwritten.
    If the run itself was deleted, its points are dropped (``dropped`` counts them).
    ``pg_method`` (PostgreSQL only): "copy" (the default), or for comparison
    "copy_upsert" (always ON CONFLICT) or "executemany" (pipelined upserts).
    """

    def __init__(
        self,
        engine: Engine,
        run_id: int,
        flush_interval: float = 0.25,
        max_pending: int = 5000,
        *,
        max_retry_delay: float = 5.0,
        close_timeout: float = 30.0,
        pg_method: str = "copy",
    ) -> None:
        if flush_interval <= 0:
            raise ValueError(f"flush_interval: must be > 0, got {flush_interval}")
        if max_pending < 1:
            raise ValueError(f"max_pending: must be >= 1, got {max_pending}")
        self.engine = engine
        self.run_id = int(run_id)
        self.flush_interval = flush_interval
        self.max_pending = max_pending
        self.max_retry_delay = max_retry_delay
        self.close_timeout = close_timeout
        self.written = 0  # points committed (a rewritten point counts again)
        self.dropped = 0  # points discarded because the run no longer exists
        self.failures = 0  # failed write attempts so far
        self.last_error: BaseException | None = None
        if pg_method not in PG_METHODS:
            raise ValueError(f"pg_method: one of {sorted(PG_METHODS)}, got {pg_method!r}")
        pg = engine.dialect.name == "postgresql"
        self._write_rows = PG_METHODS[pg_method] if pg else _sqlite_write
        self._rows: list[Row] = []
        self._rows_lock = threading.Lock()  # guards _rows and the duplicate tracking
        self._write_lock = threading.Lock()  # one write at a time keeps the order
        self._maybe_dupes = False
        self._last_step = -(2**63)
        self._keys_at_last_step: set[str] = set()
        self._known_keys: set[str] = set()
        self._run_gone = False
        self._closed = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"metric-writer-{self.run_id}", daemon=True
        )
        self._thread.start()

    # --- public API -------------------------------------------------------------------
    def add(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        """Queue ``values`` (key -> number) recorded at iteration ``step``."""
        step, epoch, wall_time = int(step), float(epoch), float(wall_time)
        run_id = self.run_id
        rows: list[Row] = []
        for key, value in values.items():
            if key not in self._known_keys:
                self._check_key(key)
            try:
                rows.append((run_id, key, step, epoch, wall_time, float(value)))
            except (TypeError, ValueError):
                raise ValueError(f"{key}: value must be a number, got {value!r}") from None
        with self._rows_lock:
            # Checked under the lock: a point accepted here is in the queue close() drains.
            if self._closed:
                raise RuntimeError(f"MetricWriter of run {self.run_id} is closed")
            self._track_duplicates(step, values)
            self._rows.extend(rows)
            full = len(self._rows) >= self.max_pending
        if full:
            self._wake.set()

    def flush(self) -> None:
        """Write everything queued so far, now; MetricWriteError if that fails."""
        with self._write_lock:
            try:
                self._write_pending()
            except Exception as exc:
                raise MetricWriteError(
                    f"run {self.run_id}: {self.pending} points not written: {exc}"
                ) from exc

    def close(self) -> None:
        """Stop the thread and write the rest; MetricWriteError if points remain."""
        with self._rows_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        self._wake.set()
        self._thread.join()
        deadline = time.monotonic() + self.close_timeout
        delay = self.flush_interval
        while True:
            try:
                self.flush()
                return
            except MetricWriteError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)

    @property
    def pending(self) -> int:
        with self._rows_lock:
            return len(self._rows)

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------
    def _check_key(self, key: object) -> None:
        if not isinstance(key, str) or not key or len(key) > KEY_MAX_LEN:
            raise ValueError(
                f"metric key must be a non-empty string of at most "
                f"{KEY_MAX_LEN} characters, got {key!r}"
            )
        self._known_keys.add(key)

    def _track_duplicates(self, step: int, values: Mapping[str, float]) -> None:
        # PostgreSQL's ON CONFLICT cannot touch one row twice in a statement, so a batch
        # that may hold a (key, step) twice is deduplicated before the COPY. Steps only
        # grow in a normal run; a repeat shows up as a step that went back, or as a key
        # seen again at the current step.
        if step > self._last_step:
            self._last_step = step
            self._keys_at_last_step = set(values)
        elif step == self._last_step and self._keys_at_last_step.isdisjoint(values):
            self._keys_at_last_step.update(values)
        else:
            self._maybe_dupes = True

    def _take(self) -> tuple[list[Row], bool]:
        with self._rows_lock:
            rows, self._rows = self._rows, []
            dupes, self._maybe_dupes = self._maybe_dupes, False
            return rows, dupes

    def _put_back(self, rows: list[Row], dupes: bool) -> None:
        with self._rows_lock:
            self._rows[:0] = rows
            self._maybe_dupes = self._maybe_dupes or dupes

    def _write_pending(self) -> None:
        """Write the queue; on failure put it back in front and re-raise (caller locks)."""
        rows, dupes = self._take()
        if not rows:
            return
        if self._run_gone:
            self.dropped += len(rows)
            return
        if dupes:
            rows = list({(r[1], r[2]): r for r in rows}.values())
        try:
            self._write_rows(self.engine, self.run_id, rows)
        except RunGone:
            self._run_gone = True
            self.dropped += len(rows)
            log.warning("run %s was deleted: dropping its metric points", self.run_id)
            return
        except BaseException:
            self._put_back(rows, dupes)
            raise
        self.written += len(rows)

    def _loop(self) -> None:
        delay = self.flush_interval
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return  # close() writes the rest synchronously
            with self._write_lock:
                try:
                    self._write_pending()
                except Exception as exc:
                    self.failures += 1
                    self.last_error = exc
                    delay = min(self.max_retry_delay, self.flush_interval * 2**self.failures)
                    log.error(
                        "run %s: writing %d metric points failed (attempt %d, retry in %.1f s): %s",
                        self.run_id,
                        self.pending,
                        self.failures,
                        delay,
                        exc,
                    )
                    continue
            delay = self.flush_interval


class RunGone(Exception):
    """The run of a batch no longer exists (deleted while it trained)."""


# Each write takes the run row's lock before inserting (the per-batch stand-in for a
# foreign key, see store.models.MetricPoint) and raises RunGone if the row is missing.


def _sqlite_write(engine: Engine, run_id: int, rows: list[Row]) -> None:
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        try:
            # IMMEDIATE: take the write lock (waiting up to the busy timeout) before the
            # check, so no delete can slip in between the check and the insert.
            cur.execute("BEGIN IMMEDIATE")
            if cur.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone() is None:
                raise RunGone(run_id)
            cur.executemany(_SQLITE_UPSERT, rows)
        finally:
            cur.close()
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


_PG_LOCK_RUN = "SELECT 1 FROM runs WHERE id = %s FOR KEY SHARE"


def _insert_new(conn: Any, cur: Any) -> bool:
    """Plain INSERT of the staged rows in a savepoint; False if one was already stored."""
    from psycopg.errors import UniqueViolation

    try:
        with conn.transaction():
            cur.execute(_PG_INSERT)
    except UniqueViolation:
        return False
    return True


def _pg_write(engine: Engine, run_id: int, rows: list[Row], *, optimistic: bool = True) -> None:
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.cursor() as cur:
            if cur.execute(_PG_LOCK_RUN, (run_id,)).fetchone() is None:
                raise RunGone(run_id)
            cur.execute(_PG_STAGE)
            with cur.copy("COPY metric_stage FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(_PG_STAGE_TYPES)
                for row in rows:
                    copy.write_row(row)
            # A plain INSERT costs the server ~40% less than ON CONFLICT's speculative
            # insertion, and new points are the rule; a batch that rewrites steps (a
            # resumed run) fails it inside a savepoint and is merged instead.
            if not (optimistic and _insert_new(conn, cur)):
                cur.execute(_PG_MERGE)
        conn.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


_PG_UPSERT = (
    f"INSERT INTO metric_points ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "
    f"ON CONFLICT (run_id, key, step) DO UPDATE SET {_UPDATE}"
)


def _pg_write_executemany(engine: Engine, run_id: int, rows: list[Row]) -> None:
    """The alternative to COPY: psycopg 3 runs executemany in pipeline mode."""
    raw = engine.raw_connection()
    try:
        conn = raw.driver_connection
        with conn.cursor() as cur:
            if cur.execute(_PG_LOCK_RUN, (run_id,)).fetchone() is None:
                raise RunGone(run_id)
            cur.executemany(_PG_UPSERT, rows)
        conn.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()


# "copy" is the one in use; the others stay for bench/ingest.py's comparison.
PG_METHODS: dict[str, Callable[[Engine, int, list[Row]], None]] = {
    "copy": _pg_write,
    "copy_upsert": partial(_pg_write, optimistic=False),
    "executemany": _pg_write_executemany,
}


# ---------------------------------------------------------------------------------------
# Reading: the series cache

CACHE_MAX_POINTS = 4_000_000  # about 128 MB of float64 columns before eviction


class _Series:
    """One (run, key) series as growable numpy columns, ordered by step."""

    __slots__ = ("token", "n", "cols", "sorted", "lock")

    def __init__(self, token: int) -> None:
        self.token = token
        self.n = 0
        self.cols: dict[str, np.ndarray] = {
            "step": np.empty(0, np.int64),
            "epoch": np.empty(0, np.float64),
            "wall_time": np.empty(0, np.float64),
            "value": np.empty(0, np.float64),
        }
        self.sorted = {"step": True, "epoch": True, "wall_time": True}
        self.lock = threading.Lock()

    @property
    def last_step(self) -> int:
        return int(self.cols["step"][self.n - 1]) if self.n else -1

    def extend(self, new: Mapping[str, np.ndarray]) -> None:
        m = len(new["step"])
        if not m:
            return
        need = self.n + m
        if need > len(self.cols["step"]):
            # Grow by doubling: appending a few points to a 1M series must not copy it.
            cap = max(need, 2 * len(self.cols["step"]), 1024)
            for name, col in self.cols.items():
                grown = np.empty(cap, col.dtype)
                grown[: self.n] = col[: self.n]
                self.cols[name] = grown
        for name in ("epoch", "wall_time"):
            if self.sorted[name]:
                chunk = new[name]
                prev = self.cols[name][self.n - 1 : self.n]
                self.sorted[name] = bool(np.all(np.diff(np.concatenate((prev, chunk))) >= 0))
        # Only slots beyond n are written, so views handed out earlier stay valid.
        for name, col in self.cols.items():
            col[self.n : need] = new[name]
        self.n = need

    def view(self) -> dict[str, np.ndarray]:
        return {name: col[: self.n] for name, col in self.cols.items()}


_cache: OrderedDict[tuple[str, int, str], _Series] = OrderedDict()
_cache_lock = threading.Lock()


def invalidate(run_id: int | None = None) -> None:
    """Forget cached series of one run (every run when None), in every engine."""
    with _cache_lock:
        for k in [k for k in _cache if run_id is None or k[1] == run_id]:
            del _cache[k]


def _cached(engine: Engine, run_id: int, key: str, token: int) -> _Series:
    ck = (str(engine.url), run_id, key)
    with _cache_lock:
        series = _cache.get(ck)
        if series is None or series.token != token:
            series = _cache[ck] = _Series(token)
        _cache.move_to_end(ck)
        return series


def _evict() -> None:
    with _cache_lock:
        total = sum(s.n for s in _cache.values())
        while total > CACHE_MAX_POINTS and len(_cache) > 1:
            _, oldest = _cache.popitem(last=False)
            total -= oldest.n


_COLUMN_DTYPES = {"step": "i8", "epoch": "f8", "wall_time": "f8", "value": "f8"}


def _fetch_after(conn: sa.Connection, run_id: int, key: str, after: int) -> dict[str, np.ndarray]:
    """Columns of the points of (run, key) with step > after, in step order."""
    if conn.dialect.name == "postgresql":
        return _pg_fetch_after(conn, run_id, key, after)
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
        for i, (name, dtype) in enumerate(_COLUMN_DTYPES.items())
    }


# PostgreSQL: each column comes back as one binary array (array_agg), which numpy reads
# in place: row-by-row results (or COPY, one message per row) cost a Python object per
# value, several times the query itself for a long series.
_PG_FETCH = (
    "SELECT array_agg(step), array_agg(epoch), array_agg(wall_time), "
    "array_agg(COALESCE(value, 'NaN'::float8)) FROM (SELECT step, epoch, wall_time, value "
    "FROM metric_points WHERE run_id = %s AND key = %s AND step > %s ORDER BY step) AS t"
)


def _pg_fetch_after(
    conn: sa.Connection, run_id: int, key: str, after: int
) -> dict[str, np.ndarray]:
    from psycopg.postgres import types

    driver = conn.connection.driver_connection
    with driver.cursor(binary=True) as cur:
        for name in ("int8", "float8"):
            cur.adapters.register_loader(types[name].array_oid, _raw_bytes_loader())
        row = cur.execute(_PG_FETCH, (run_id, key, after)).fetchone()
    return {
        name: _binary_array(buf, dtype)
        for (name, dtype), buf in zip(_COLUMN_DTYPES.items(), row, strict=True)
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


def _run_state(conn: sa.Connection, run_id: int) -> tuple[int, str] | None:
    """The run's attempt count (its cache token) and status; None: no such run."""
    row = conn.execute(
        sa.text("SELECT attempts, status FROM runs WHERE id = :r"), {"r": run_id}
    ).first()
    return None if row is None else (int(row[0]), str(row[1]))


def _json_floats(values: np.ndarray) -> list[float | None]:
    out = values.tolist()
    if not np.isfinite(values).all():
        out = [v if math.isfinite(v) else None for v in out]
    return out


def _empty_series() -> dict[str, Any]:
    return {"step": [], "epoch": [], "wall_time": [], "value": [], "total": 0}


def read_series(
    engine: Engine,
    run_id: int,
    keys: Iterable[str] | None,
    *,
    x: str = "step",
    max_points: int = 2000,
    x_min: float | None = None,
    x_max: float | None = None,
) -> dict[str, dict[str, Any]]:
    """Downsampled series of ``keys`` (all keys when None), as JSON-ready lists.

    ``x`` (step | epoch | wall_time) is the column ``x_min``/``x_max`` filter on
    (inclusive) and the axis MinMaxLTTB buckets along. ``total`` counts the points in
    the range before downsampling. Keys without points give empty lists.
    """
    if x not in X_COLUMNS:
        raise ValueError(f"x: must be one of {X_COLUMNS}, got {x!r}")
    if isinstance(keys, str):
        keys = [keys]
    with engine.connect() as conn:
        state = _run_state(conn, run_id)
        if state is None:
            invalidate(run_id)
            return {k: _empty_series() for k in keys or []}
        token, status = state
        wanted = list(keys) if keys is not None else _keys(conn, run_id)
        out: dict[str, dict[str, Any]] = {}
        if (
            status in FINAL_STATUSES
            and x_min is None
            and x_max is None
            and max_points <= OVERVIEW_POINTS // 2
        ):
            uncached = [k for k in wanted if not _is_cached(engine, run_id, k, token)]
            for key, (view, total) in _read_overviews(conn, run_id, uncached, token).items():
                sorted_x = bool(np.all(np.diff(view[x]) >= 0))
                out[key] = {
                    **_downsample_view(view, x, sorted_x, max_points, None, None),
                    "total": total,
                }
        views: dict[str, tuple[dict[str, np.ndarray], bool]] = {}
        for key in wanted:
            if key in out:
                continue
            series = _cached(engine, run_id, key, token)
            with series.lock:
                series.extend(_fetch_after(conn, run_id, key, series.last_step))
                views[key] = (series.view(), series.sorted.get(x, True))
    _evict()
    out.update(
        (key, _downsample_view(view, x, x_sorted, max_points, x_min, x_max))
        for key, (view, x_sorted) in views.items()
    )
    return {key: out[key] for key in wanted}


# ---------------------------------------------------------------------------------------
# Overviews: a finished run's series downsampled once and stored (store.models.SeriesOverview)

# Points kept per series: views asking for at most half of it (a compare view asks for
# ~1500) are drawn from the overview, which MinMaxLTTB made min/max-preserving.
OVERVIEW_POINTS = 8192


def _pack(view: Mapping[str, np.ndarray]) -> bytes:
    return b"".join(
        np.ascontiguousarray(view[name], dtype="<" + dtype).tobytes()
        for name, dtype in _COLUMN_DTYPES.items()
    )


def _unpack(data: bytes) -> dict[str, np.ndarray]:
    n = len(data) // (8 * len(_COLUMN_DTYPES))
    return {
        name: np.frombuffer(data, dtype="<" + dtype, count=n, offset=8 * n * i).astype(dtype)
        for i, (name, dtype) in enumerate(_COLUMN_DTYPES.items())
    }


def build_overviews(engine: Engine, run_id: int) -> int:
    """Store the run's every series downsampled to OVERVIEW_POINTS; returns how many.

    Called when a run finishes (the worker) and for finished runs still lacking them (the
    API's maintenance loop). Reads the points directly, not through the cache, so a
    worker process does not keep a finished run's series in memory.
    """
    with engine.connect() as conn:
        state = _run_state(conn, run_id)
        if state is None:
            return 0
        token, _ = state
        rows = []
        for key in _keys(conn, run_id):
            view = _fetch_after(conn, run_id, key, -1)
            idx = downsample_indices(view["step"], view["value"], OVERVIEW_POINTS, x_sorted=True)
            small = {name: col[idx] for name, col in view.items()}
            rows.append(
                {"r": run_id, "k": key, "a": token, "t": len(view["step"]), "d": _pack(small)}
            )
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM series_overviews WHERE run_id = :r"), {"r": run_id})
        if rows:
            conn.execute(
                sa.text(
                    "INSERT INTO series_overviews (run_id, key, attempts, total, data) "
                    "VALUES (:r, :k, :a, :t, :d)"
                ),
                rows,
            )
    return len(rows)


def runs_missing_overviews(engine: Engine, limit: int = 5) -> list[int]:
    """Finished runs with points but no overview (older runs, a worker that died after
    finishing), oldest first."""
    q = sa.text(
        "SELECT id FROM runs WHERE status IN ("
        + ", ".join(f"'{s}'" for s in FINAL_STATUSES)
        + ") AND NOT EXISTS (SELECT 1 FROM series_overviews o WHERE o.run_id = runs.id)"
        " AND EXISTS (SELECT 1 FROM metric_points m WHERE m.run_id = runs.id)"
        " ORDER BY id LIMIT :n"
    )
    with engine.connect() as conn:
        return [int(r[0]) for r in conn.execute(q, {"n": limit})]


def _read_overviews(
    conn: sa.Connection, run_id: int, keys: list[str], token: int
) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    if not keys:
        return {}
    q = sa.text(
        "SELECT key, total, data FROM series_overviews "
        "WHERE run_id = :r AND attempts = :a AND key IN :keys"
    ).bindparams(sa.bindparam("keys", expanding=True))
    rows = conn.execute(q, {"r": run_id, "a": token, "keys": keys})
    return {key: (_unpack(bytes(data)), int(total)) for key, total, data in rows}


def _is_cached(engine: Engine, run_id: int, key: str, token: int) -> bool:
    with _cache_lock:
        series = _cache.get((str(engine.url), run_id, key))
        return series is not None and series.token == token and series.n > 0


def _downsample_view(
    view: dict[str, np.ndarray],
    x: str,
    x_sorted: bool,
    max_points: int,
    x_min: float | None,
    x_max: float | None,
) -> dict[str, Any]:
    xs = view[x]
    if x_min is not None or x_max is not None:
        if x_sorted:
            lo = 0 if x_min is None else int(np.searchsorted(xs, x_min, side="left"))
            hi = len(xs) if x_max is None else int(np.searchsorted(xs, x_max, side="right"))
            view = {name: col[lo:hi] for name, col in view.items()}
        else:
            mask = np.ones(len(xs), dtype=bool)
            if x_min is not None:
                mask &= xs >= x_min
            if x_max is not None:
                mask &= xs <= x_max
            view = {name: col[mask] for name, col in view.items()}
    total = len(view["step"])
    idx = downsample_indices(view[x], view["value"], max_points, x_sorted=x_sorted)
    return {
        "step": view["step"][idx].tolist(),
        "epoch": _json_floats(view["epoch"][idx]),
        "wall_time": _json_floats(view["wall_time"][idx]),
        "value": _json_floats(view["value"][idx]),
        "total": total,
    }


# ---------------------------------------------------------------------------------------
# Reading: small queries

# Distinct keys of a run by skipping through the primary-key index (a loose index scan),
# instead of reading every point: each step finds the next key after the previous one.
_KEYS_CTE = (
    "WITH RECURSIVE k(key) AS ("
    " SELECT MIN(key) FROM metric_points WHERE run_id = :r"
    " UNION ALL"
    " SELECT (SELECT MIN(m.key) FROM metric_points m WHERE m.run_id = :r AND m.key > k.key)"
    " FROM k WHERE k.key IS NOT NULL)"
)


def _keys(conn: sa.Connection, run_id: int) -> list[str]:
    q = sa.text(_KEYS_CTE + " SELECT key FROM k WHERE key IS NOT NULL")
    return [row[0] for row in conn.execute(q, {"r": run_id})]


def keys(engine: Engine, run_id: int) -> list[str]:
    """The metric keys a run has points for, sorted."""
    with engine.connect() as conn:
        return _keys(conn, run_id)


def latest_step(engine: Engine, run_id: int) -> int | None:
    """The highest step of any key of the run; None when it has no points."""
    q = sa.text(
        _KEYS_CTE + " SELECT MAX((SELECT MAX(m.step) FROM metric_points m"
        " WHERE m.run_id = :r AND m.key = k.key)) FROM k WHERE k.key IS NOT NULL"
    )
    with engine.connect() as conn:
        value = conn.execute(q, {"r": run_id}).scalar()
    return None if value is None else int(value)


def read_since(
    engine: Engine,
    run_id: int,
    cursors: Mapping[str, int],
    *,
    limit_per_key: int | None = None,
) -> list[dict[str, Any]]:
    """Points with ``step > cursors.get(key, -1)``, ordered by (step, key).

    Cursors are per key because an epoch-level key is logged after the iteration keys
    of the same step. ``limit_per_key`` caps a catch-up (the caller advances its cursors
    to the last step it got and asks again).
    """
    q = (
        "SELECT step, epoch, wall_time, value FROM metric_points "
        "WHERE run_id = :r AND key = :k AND step > :c ORDER BY step"
    )
    if limit_per_key is not None:
        q += f" LIMIT {int(limit_per_key)}"
    stmt = sa.text(q)
    points: list[dict[str, Any]] = []
    with engine.connect() as conn:
        for key in _keys(conn, run_id):
            cursor = int(cursors.get(key, -1))
            for step, epoch, wall_time, value in conn.execute(
                stmt, {"r": run_id, "k": key, "c": cursor}
            ):
                points.append(
                    {
                        "key": key,
                        "step": step,
                        "epoch": _finite_or_none(epoch),
                        "wall_time": _finite_or_none(wall_time),
                        "value": _finite_or_none(value),
                    }
                )
    points.sort(key=lambda p: (p["step"], p["key"]))
    return points


def _finite_or_none(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def write_points(
    engine: Engine,
    run_id: int,
    points: Sequence[tuple[int, Mapping[str, float], float, float]],
) -> None:
    """Write (step, values, epoch, wall_time) tuples now (imports, tests, tools)."""
    with MetricWriter(engine, run_id) as writer:
        for step, values, epoch, wall_time in points:
            writer.add(step, values, epoch=epoch, wall_time=wall_time)
