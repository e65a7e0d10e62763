"""The database-backed metric sink a worker hands to ``trainer.fit``.

The training loop must not wait on the database: ``DbSink.log`` only appends to the
store's ``MetricWriter`` (which flushes in its own thread) and notes where the run is;
the synchronous writes are the run's device at ``start`` (before the first iteration)
and at each epoch end, just before the trainer's checkpoint.
Everything that talks to the database per second lives in ``RunMonitor``, a background
thread that writes progress / ETA (which is also the run's heartbeat) and reads the
cancel flag, so ``should_stop()`` is a plain attribute read.

Points survive a database outage: when the epoch-end write fails, the queued points are
appended to the run's spool file (fsynced) before the trainer may write its checkpoint,
and so are those left when ``close`` gives up. The next writer of the run (a resumed
attempt, or the task before it records the final status) replays the file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from core.status import RunStatus
from store import db, runs
from store.metrics import MetricWriteError, MetricWriter
from trainer.spec import RunSpec
from worker.sysmetrics import SystemSampler

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
# Between heartbeats the monitor reads only the cancel flag, this often: a cancel reaches
# the training loop (which asks at each metric flush, ~4 per second) well within a second.
CANCEL_POLL_S = 0.25
# In the run's folder: the points the database refused, until it takes them.
SPOOL_FILE = "points.spool"
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
            elif not self.should_stop():
                self.check_cancel()  # between heartbeats: a cancel is seen within 0.25 s
            wake_at = min(next_tick, time.monotonic() + CANCEL_POLL_S)
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
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
                    run.status != RunStatus.RUNNING or run.attempts != self.attempt
                ):
                    self.lost = True
                    return
                if state is None:
                    runs.heartbeat(s, self.run_id)
                else:
                    runs.set_progress(s, self.run_id, state[0], state[1])
                if run.cancel_requested or run.status == RunStatus.CANCELLED:
                    self.cancelled = True
        except Exception:
            now = time.monotonic()
            if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
                self._last_error_log = now
                log.warning("run %s: heartbeat failed; retrying", self.run_id, exc_info=True)

    def check_cancel(self) -> None:
        """One read of the cancel flag (a primary-key lookup), no heartbeat."""
        try:
            with db.session(self.engine) as s:
                if runs.cancel_requested(s, self.run_id):
                    self.cancelled = True
        except Exception:  # the next heartbeat logs a database that stays away
            pass

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


def device_text(meta: Mapping[str, Any]) -> str:
    """The device of the trainer's ``meta``, in the words of the worker's device probe:
    "cpu (2 cores), torch 2.13.0+cpu", "cuda:0 NVIDIA H200 (139 GiB), torch 2.13.0+cu128,
    CUDA 12.8"; under DDP rank 0's device and " x N processes"."""
    import torch  # the trainer has imported it already

    from worker.gpus import GpuInfo, probe_devices

    report = probe_devices()  # CPU cores and the torch / CUDA versions; no CUDA call
    device = torch.device(str(meta.get("device", "cpu")))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        name = str(meta.get("device_name") or props.name)
        text = replace(report, gpus=(GpuInfo(index, name, int(props.total_memory)),)).describe()
    elif device.type == "cpu":
        text = report.describe()
    else:  # mps, xpu, ...: what torch calls it
        text = f"{device}, torch {report.torch_version}"
    nproc, nodes = int(meta.get("nproc") or 1), int(meta.get("nodes") or 1)
    if nproc <= 1:
        return text
    return f"{text} x {nproc} processes" + (f" on {nodes} nodes" if nodes > 1 else "")


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
        spool: Path | None = None,
        sys_metrics: bool = False,
        sys_pid: int | None = None,
    ) -> None:
        self.engine, self.run_id, self.attempt = engine, run_id, attempt
        self.epochs = float(spec.epochs)
        # Without checkpoints a re-queued run starts over and rewrites every point.
        self._checkpointed = spec.checkpoint
        self.meta: dict[str, Any] = {}
        self.writer = writer if writer is not None else MetricWriter(engine, run_id, spool=spool)
        self.unstored = 0  # points neither in the database nor in the spool after close
        # Written by log() in the training thread, read by the monitor thread. Each is
        # one attribute store, atomic under the GIL; the pair is read together below.
        self._first: tuple[float, float] | None = None  # (epoch, wall_time) of 1st log
        self._last: tuple[float, float] | None = None
        self._last_at: tuple[int, float] = (0, 0.0)  # (step, monotonic time) of _last
        self._closed = False
        self.monitor = RunMonitor(
            engine, run_id, attempt=attempt, progress=self._progress, interval=interval
        )
        # CPU / memory / GPU samples of the process tree ``sys_pid`` (worker.sysmetrics).
        self.sampler = (
            SystemSampler(self.writer.add, self._sample_clock, pid=sys_pid) if sys_metrics else None
        )

    # --- MetricSink -----------------------------------------------------------------
    def start(self, meta: Mapping[str, Any]) -> None:
        """Keep the trainer's meta and record the device the run trains on (once, before
        the first iteration; a failure is logged, never the run's end)."""
        self.meta = dict(meta)
        try:
            device = device_text(self.meta)
            with db.session(self.engine) as s:
                runs.record_device(s, self.run_id, device, attempt=self.attempt)
        except Exception:
            log.warning("run %s: could not record its device", self.run_id, exc_info=True)

    def log(
        self, step: int, values: Mapping[str, float], *, epoch: float, wall_time: float
    ) -> None:
        self.writer.add(step, values, epoch=epoch, wall_time=wall_time)
        last = (epoch, wall_time)
        if self._first is None:
            self._first = last
        self._last_at = (step, time.monotonic())
        self._last = last
        if self._checkpointed and float(epoch).is_integer():
            if "loss" in values:
                # The epoch's last iteration: start writing while the trainer validates.
                self.monitor.run_soon(self._write)
            else:
                # The epoch's own values (val_err, epoch_time, ...) come last, right
                # before the trainer writes the checkpoint.
                self._flush()

    def _write(self) -> None:
        try:
            self.writer.flush()
        except MetricWriteError as exc:
            log.warning("run %s: %s; retrying", self.run_id, exc)

    def _flush(self) -> None:
        """Store or spool the queued points now (at an epoch end, before the checkpoint).

        A resumed run restarts after its last checkpoint, so every point before the
        checkpoint must be stored, or spooled to local disk: points held only in memory
        when the worker dies would otherwise be lost for good. If the database is down
        they go to the spool (and stay queued: the writer retries). If the disk fails
        too, this raises: the run fails before its checkpoint, never past lost points.
        """
        try:
            self.writer.flush()
        except MetricWriteError as exc:
            if self.writer.spool is None:
                log.warning("run %s: %s; they stay queued", self.run_id, exc)
                return
            try:
                added = self.writer.spool_pending()
            except OSError as disk:
                raise MetricWriteError(
                    f"{self.writer.pending} metric points could not be stored ({exc}) "
                    f"nor spooled ({disk})"
                ) from disk
            log.warning("run %s: %s; %d spooled to %s", self.run_id, exc, added, self.writer.spool)

    def close(self) -> None:
        """Flush every point (spool what the database refuses), then write the final
        progress (idempotent). MetricWriteError when points are lost for good."""
        if self._closed:
            return
        self._closed = True
        if self.sampler is not None:
            self.sampler.close()
        try:
            self.writer.close()
        except MetricWriteError as exc:
            if self.writer.spool is None:
                raise
            self.unstored = self.writer.pending
            try:
                self.writer.spool_pending()
            except OSError as disk:
                raise MetricWriteError(
                    f"{self.unstored} metric points could not be stored ({exc}) "
                    f"nor spooled ({disk})"
                ) from disk
            log.warning(
                "run %s: %s; spooled to %s for the next writer",
                self.run_id,
                exc,
                self.writer.spool,
            )
        finally:
            self.monitor.close()

    # --- for trainer.fit(should_stop=...) ---------------------------------------------
    def should_stop(self) -> bool:
        return self.monitor.should_stop()

    def _sample_clock(self) -> tuple[int, float, float] | None:
        """(step, epoch, wall time) for a system sample: the newest point's, its wall
        time advanced by the seconds since it was logged."""
        last = self._last
        if last is None:
            return None
        step, at = self._last_at
        return step, last[0], last[1] + (time.monotonic() - at)

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
