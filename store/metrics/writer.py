"""The threaded, batched, idempotent writer of one run's metric points, with a local spool."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import Engine

from core.files import append_durably
from store.metrics import postgres, sqlite
from store.metrics.live import LiveOverviews
from store.metrics.rows import Row, RunGone
from store.models import KEY_MAX_LEN

log = logging.getLogger(__name__)


# How long close() retries a failing write before it gives up.
CLOSE_TIMEOUT_S = 30.0


class MetricWriteError(RuntimeError):
    """Points could not be written; they stay queued in the writer."""


class MetricWriter:
    """Batches the points of one run into the database from a background thread.

    ``add()`` only appends to an in-memory queue (the training loop never waits on the
    database); the thread writes the queue every ``flush_interval`` seconds or once
    ``max_pending`` points wait. Each write is one transaction with the semantics of
    ``INSERT ... ON CONFLICT (run_id, key, step) DO UPDATE``, so a resumed run that logs
    the same steps again stores every point once, last value winning.

    ``add`` is thread-safe and cheap. A failed background write keeps its points queued,
    logs the error, exposes it as ``last_error`` and retries with backoff (up to
    ``max_retry_delay`` seconds apart). ``flush`` writes synchronously and raises
    ``MetricWriteError`` on failure; ``close`` flushes, retrying for up to
    ``close_timeout`` seconds, and raises if points are still unwritten.
    If the run itself was deleted, its points are dropped (``dropped`` counts them).

    With ``spool`` (a file in the run's folder), ``spool_pending()`` appends the queued
    points not in the file yet and fsyncs it, so they survive this process; the file is
    deleted once every point in it is committed. A writer that finds the file at start
    queues its points first (the upsert makes replaying safe).

    Committed points also feed the run's live series overviews (``store.metrics.live``),
    stored about once a second and at close, so plots of a running run need not read
    every point.
    """

    def __init__(
        self,
        engine: Engine,
        run_id: int,
        flush_interval: float = 0.25,
        max_pending: int = 5000,
        *,
        max_retry_delay: float = 5.0,
        close_timeout: float | None = None,
        spool: Path | None = None,
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
        self.close_timeout = CLOSE_TIMEOUT_S if close_timeout is None else close_timeout
        self.written = 0  # points committed (a rewritten point counts again)
        self.dropped = 0  # points discarded because the run no longer exists
        self.failures = 0  # failed write attempts so far
        self.last_error: BaseException | None = None
        self._backend = postgres if engine.dialect.name == "postgresql" else sqlite
        self._rows: list[Row] = []
        self._rows_lock = threading.Lock()  # guards _rows and the duplicate tracking
        self._write_lock = threading.Lock()  # one write at a time keeps the order
        self._maybe_dupes = False
        self._last_step = -(2**63)
        self._keys_at_last_step: set[str] = set()
        self._known_keys: set[str] = set()
        self._run_gone = False
        self._closed = False
        self._live = LiveOverviews(engine, self.run_id)
        # The queue is always the rows numbered [_seq_done, _seq_added) of everything
        # added, in order: writes take the whole queue and put it back whole on failure.
        # The spool file holds the rows up to _spooled_to.
        self._seq_added = self._seq_done = self._spooled_to = 0
        self.spool = spool
        self._spool_live = spool is not None and spool.exists()  # a file to delete when done
        if spool is not None and self._spool_live:
            self._rows = read_spool(spool, self.run_id)
            self._seq_added = self._spooled_to = len(self._rows)
            self._maybe_dupes = True  # a resumed attempt may log the same steps again
            if self._rows:
                log.warning("run %s: replaying %d spooled points", self.run_id, len(self._rows))
            else:
                spool.unlink(missing_ok=True)
                self._spool_live = False
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
            self._seq_added += len(rows)
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
                self._publish_overviews()
                return
            except MetricWriteError:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)

    def spool_pending(self) -> int:
        """Append the queued points the spool lacks to it, fsynced; how many were added.
        OSError when the disk fails too (the points then exist in this process only)."""
        if self.spool is None:
            raise RuntimeError(f"MetricWriter of run {self.run_id} has no spool file")
        with self._write_lock, self._rows_lock:
            start = max(self._spooled_to, self._seq_done)
            rows = self._rows[start - self._seq_done :]
            if rows:
                append_spool(self.spool, rows)
                self._spool_live = True
            self._spooled_to = self._seq_added
            return len(rows)

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

    def _write_rows(self, rows: list[Row]) -> None:
        """One transaction of ``rows``, RunGone if the run is gone (bench/ingest.py
        overrides this to measure other ways of writing)."""
        self._backend.write_rows(self.engine, self.run_id, rows)

    def _write_pending(self) -> None:
        """Write the queue; on failure put it back in front and re-raise (caller locks)."""
        taken, dupes = self._take()
        if not taken:
            return
        if self._run_gone:
            self.dropped += len(taken)
            self._done(len(taken))
            return
        rows = list({(r[1], r[2]): r for r in taken}.values()) if dupes else taken
        try:
            self._write_rows(rows)
        except RunGone:
            self._run_gone = True
            self.dropped += len(taken)
            log.warning("run %s was deleted: dropping its metric points", self.run_id)
            self._done(len(taken))
            return
        except BaseException:
            self._put_back(taken, dupes)  # whole, so the queue stays [_seq_done, _seq_added)
            raise
        self.written += len(rows)
        self._done(len(taken))
        self._live.feed(rows, ordered=not dupes)
        if self._live.due():
            self._publish_overviews()

    def _publish_overviews(self) -> None:
        """Store the live overviews; a failure only delays them (readers then read more
        points), so it is logged and retried with the next write."""
        try:
            self._live.publish()
        except Exception as exc:
            log.warning("run %s: storing the live series overviews failed: %s", self.run_id, exc)

    def _done(self, n: int) -> None:
        """``n`` more rows are committed (or dropped); the spool goes once it is all in."""
        with self._rows_lock:
            self._seq_done += n
            spool_done = self._spool_live and self._seq_done >= self._spooled_to
            if spool_done:
                self._spool_live = False
        if spool_done and self.spool is not None:
            self.spool.unlink(missing_ok=True)

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


def write_points(
    engine: Engine,
    run_id: int,
    points: Sequence[tuple[int, Mapping[str, float], float, float]],
) -> None:
    """Write (step, values, epoch, wall_time) tuples now (imports, tests, tools)."""
    with MetricWriter(engine, run_id) as writer:
        for step, values, epoch, wall_time in points:
            writer.add(step, values, epoch=epoch, wall_time=wall_time)


def append_spool(path: Path, rows: Sequence[Row]) -> None:
    """Append rows to a spool file as JSON lines and fsync it (and a new file's folder)."""
    append_durably(path, "".join(json.dumps([r[1], r[2], r[3], r[4], r[5]]) + "\n" for r in rows))


def read_spool(path: Path, run_id: int) -> list[Row]:
    """The rows of a spool file; a torn last line (a crash while appending) is skipped:
    its append never returned, so no checkpoint was taken past it."""
    rows: list[Row] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            key, step, epoch, wall_time, value = json.loads(line)
        except ValueError:
            continue
        rows.append((run_id, str(key), int(step), float(epoch), float(wall_time), float(value)))
    return rows
