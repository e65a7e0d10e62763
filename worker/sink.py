"""The database-backed metric sink a worker hands to ``trainer.fit``.

The training loop must not wait on the database: ``DbSink.log`` only appends to the
store's ``MetricWriter`` (which flushes in its own thread) and notes where the run is;
the one synchronous write is at each epoch end, just before the trainer's checkpoint.
Everything that talks to the database per second lives in ``RunMonitor``, a background
thread that writes progress / ETA (which is also the run's heartbeat) and reads the
cancel flag, so ``should_stop()`` is a plain attribute read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.engine import Engine

from store import db, runs
from store.metrics import MetricWriteError, MetricWriter
from trainer.spec import RunSpec

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# Log a failing heartbeat once per this many seconds, not once per tick.
_ERROR_LOG_EVERY_S = 60.0

ProgressFn = Callable[[], tuple[float, float | None] | None]


class RunMonitor:
    """Every ``interval`` s: heartbeat (with progress / ETA when known), read cancel flag.

    Starts at construction, so a run shows signs of life while torch imports and data
    loads. A database hiccup is logged and retried on the next tick; it never reaches
    the training loop.

    With ``attempt`` given, the monitor also notices when the run stopped being this
    attempt's (re-queued by the reaper after a long silence, then started elsewhere):
    ``lost`` turns True, heartbeats stop and ``should_stop()`` says stop.
    """

    def __init__(
        self,
        engine: Engine,
        run_id: int,
        *,
        attempt: int | None = None,
        progress: ProgressFn | None = None,
        interval: float = HEARTBEAT_S,
    ) -> None:
        self.engine = engine
        self.run_id = run_id
        self.attempt = attempt
        self.interval = interval
        self.cancelled = False
        self.lost = False
        self._progress = progress
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._job: Callable[[], None] | None = None
        self._last_error_log = -_ERROR_LOG_EVERY_S
        self._thread = threading.Thread(
            target=self._loop, name=f"run-{run_id}-monitor", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() >= next_tick:
                self.tick()
                next_tick = time.monotonic() + self.interval
            self._wake.wait(max(0.0, next_tick - time.monotonic()))
            self._wake.clear()
            job, self._job = self._job, None
            if job is not None and not self._stop.is_set():
                job()

    def run_soon(self, job: Callable[[], None]) -> None:
        """Run ``job`` on this thread as soon as it is free (off the training thread)."""
        self._job = job
        self._wake.set()

    def tick(self) -> None:
        """One heartbeat and one read of the cancel flag (one short transaction)."""
        if self.lost:
            return
        try:
            state = self._progress() if self._progress else None
            with db.session(self.engine) as s:
                run = runs.get_run(s, self.run_id)
                if run is None:  # deleted while training: stop, the task notices
                    self.cancelled = True
                    return
                if self.attempt is not None and (
                    run.status != "running" or run.attempts != self.attempt
                ):
                    self.lost = True
                    return
                if state is None:
                    runs.heartbeat(s, self.run_id)
                else:
                    runs.set_progress(s, self.run_id, state[0], state[1])
                if run.cancel_requested or run.status == "cancelled":
                    self.cancelled = True
        except Exception:
            now = time.monotonic()
            if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
                self._last_error_log = now
                log.warning("run %s: heartbeat failed; retrying", self.run_id, exc_info=True)

    def should_stop(self) -> bool:
        return self.cancelled or self.lost

    def close(self) -> None:
        """Stop the thread after one last tick (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self.tick()


class DbSink:
    """``MetricSink`` writing to the store, with progress, ETA, heartbeat and cancel.

    ``progress`` is epochs done / epochs; the ETA extrapolates the wall time this worker
    has spent so far (a resumed run's rate is measured from where it resumed).
    """

    def __init__(
        self,
        engine: Engine,
        run_id: int,
        spec: RunSpec,
        *,
        attempt: int | None = None,
        interval: float = HEARTBEAT_S,
        writer: MetricWriter | None = None,
    ) -> None:
        self.run_id = run_id
        self.epochs = float(spec.epochs)
        # Without checkpoints a re-queued run starts over and rewrites every point.
        self._checkpointed = spec.checkpoint
        self.meta: dict[str, Any] = {}
        self.writer = writer if writer is not None else MetricWriter(engine, run_id)
        # Written by log() in the training thread, read by the monitor thread. Each is
        # one attribute store, atomic under the GIL; the pair is read together below.
        self._first: tuple[float, float] | None = None  # (epoch, wall_time) of 1st log
        self._last: tuple[float, float] | None = None
        self._closed = False
        self.monitor = RunMonitor(
            engine, run_id, attempt=attempt, progress=self._progress, interval=interval
        )

    # --- MetricSink -----------------------------------------------------------------
    def start(self, meta: Mapping[str, Any]) -> None:
        self.meta = dict(meta)

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        self.writer.add(step, values, epoch=epoch, wall_time=wall_time)
        last = (epoch, wall_time)
        if self._first is None:
            self._first = last
        self._last = last
        if self._checkpointed and float(epoch).is_integer():
            if "loss" in values:
                # The epoch's last iteration: start writing while the trainer validates.
                self.monitor.run_soon(self._flush)
            else:
                # The epoch's own values (val_err, epoch_time, ...) come last, right
                # before the trainer writes the checkpoint.
                self._flush()

    def _flush(self) -> None:
        """Write the queued points now (at an epoch end, before the checkpoint).

        A resumed run restarts after its last checkpoint, so every point before the
        checkpoint must already be stored: points still queued in memory when the worker
        dies would otherwise be lost for good. So the epoch-end log waits for this write
        (most of which the monitor thread has done during validation). If the database
        is down the points stay queued (the writer retries) and the run goes on: losing
        them then takes a worker crash during the outage too.
        """
        try:
            self.writer.flush()
        except MetricWriteError:
            log.warning(
                "run %s: could not store points at epoch end; they stay queued",
                self.run_id,
                exc_info=True,
            )

    def close(self) -> None:
        """Flush every point, then write the final progress (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.writer.close()
        finally:
            self.monitor.close()

    # --- for trainer.fit(should_stop=...) ---------------------------------------------
    def should_stop(self) -> bool:
        return self.monitor.should_stop()

    def _progress(self) -> tuple[float, float | None] | None:
        first, last = self._first, self._last
        if last is None or first is None:
            return None
        done = min(1.0, max(0.0, last[0] / self.epochs))
        advanced, spent = last[0] - first[0], last[1] - first[1]
        if advanced <= 0 or spent <= 0:
            return done, None
        eta = (self.epochs - last[0]) * spent / advanced
        return done, max(0.0, eta)
