"""The Celery task ``batchlab.train_run``: one run, from its claim to its final status.

Importing this module is cheap (no torch): the task imports the trainer when it runs,
so a worker's main process stays small and forks its pool children without torch's
threads in them.

Life of a delivery:
1. claim: ``store.runs.claim`` switches the run ``queued -> running``. Anything else
   (already running elsewhere, finished, cancelled while queued, deleted) means this
   message is a duplicate or obsolete: acknowledge and do nothing.
2. train: ``trainer.fit`` in this process with a ``DbSink``, or, for ``spec.nproc > 1``,
   torchrun with that many processes running ``worker.ddp_entry``.
3. finish: write the final status and summary, unless the run was taken from this
   worker meanwhile (re-queued by the reaper after a long silence).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import signals
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from core.errors import format_validation_error
from core.settings import get_settings, training_threads
from core.status import FINAL_STATUSES, RunStatus
from store import db, metrics, runs
from store.runs import run_dir
from trainer.spec import RunSpec
from worker import auto_sweep, registry
from worker.celery_app import TASK_NAME, app
from worker.launch import die_with_parent
from worker.runlog import LineWriter, RunLogWriter, capture, pump
from worker.sink import SPOOL_FILE, DbSink, RunMonitor

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DDP_LOG_FILE = "ddp.log"
# After a cancel, how long torchrun's processes get to stop on their own.
DDP_CANCEL_GRACE_S = 30.0
CLAIM_RETRY_S = 5.0
# How long the task retries storing spooled points before it gives the final status.
SPOOL_REPLAY_S = 10.0

signals.worker_ready.connect(registry.on_worker_ready, weak=False)
signals.worker_shutdown.connect(registry.on_worker_shutdown, weak=False)
signals.worker_process_init.connect(registry.on_process_init, weak=False)

# Set when Celery begins a cold shutdown (a second SIGTERM, or SIGQUIT): it interrupts the
# task where it runs (with the solo pool, as an exception raised inside the training), and
# that is no failure of the run: the attempt ends unrecorded, like a kill -9, and the reaper
# re-queues the run from its checkpoint.
cold_shutdown = threading.Event()


def _on_shutting_down(how: str = "", **_: Any) -> None:
    if str(how).lower() == "cold":
        cold_shutdown.set()


signals.worker_shutting_down.connect(_on_shutting_down, weak=False)


@dataclass
class Outcome:
    """How one attempt ended, as ``mark_finished`` takes it."""

    status: RunStatus
    error: str | None = None
    diverged_step: int | None = None
    summary: dict[str, Any] | None = field(default=None)


class InvalidSpec(ValueError):
    """The stored spec no longer validates (written by another version)."""


@dataclass(frozen=True)
class Claim:
    spec: RunSpec
    attempt: int
    uid: str  # names the run's folder (store.runs.run_dir)


def error_text(exc: BaseException) -> str:
    """The last line of the traceback: exception type and message."""
    return traceback.format_exception_only(type(exc), exc)[-1].strip()


_migrated: set[str] = set()


def _engine() -> Engine:
    engine = db.get_engine()
    key = str(engine.url)
    if key not in _migrated:
        db.migrate(engine)  # no-op at head; covers a worker started before the API
        _migrated.add(key)
    return engine


@app.task(name=TASK_NAME, bind=True)
def train_run(self: Any, run_id: int) -> str:
    """Train run ``run_id`` if it is still queued; the status it ended with."""
    worker = self.request.hostname or f"celery@{socket.gethostname()}"
    try:
        try:
            engine = _engine()
        except sa.exc.DBAPIError as exc:
            raise ClaimFailed(error_text(exc)) from exc
        return execute(engine, int(run_id), worker=worker, task_id=self.request.id)
    except ClaimFailed as exc:
        # The database was unreachable before the run was ours. Acknowledging now would
        # leave the run queued with no message, so the message goes back (with a delay).
        log.warning("run %s: cannot claim (%s); retrying in %s s", run_id, exc, CLAIM_RETRY_S)
        raise self.retry(exc=exc, countdown=CLAIM_RETRY_S, max_retries=None) from exc


class ClaimFailed(RuntimeError):
    """The database could not be asked whether the run is ours to train."""


def execute(engine: Engine, run_id: int, *, worker: str, task_id: str | None = None) -> str:
    """Claim, train and finish one run; "skipped" when it was not ours to run."""
    try:
        nodes = _nodes(engine, run_id)
    except sa.exc.DBAPIError as exc:
        raise ClaimFailed(error_text(exc)) from exc
    if nodes > 1:  # this message is a token for a node of some gang (worker/multinode.py)
        from worker import multinode

        return multinode.execute(engine, run_id, worker=worker)
    try:
        claim = _claim(engine, run_id, worker=worker, task_id=task_id)
    except sa.exc.DBAPIError as exc:
        raise ClaimFailed(error_text(exc)) from exc
    except InvalidSpec as exc:
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, RunStatus.FAILED, error=str(exc))
        return RunStatus.FAILED
    if claim is None:
        return "skipped"
    directory = run_dir(claim.uid)
    # The run's log (stdout / stderr of the training, warnings, a failure's traceback),
    # stored before the final status so a failed run's page finds it.
    runlog = RunLogWriter(engine, run_id)
    runlog.write_line("log", f"attempt {claim.attempt} on {worker}")
    try:
        if claim.spec.nproc > 1:
            outcome = _train_ddp(engine, run_id, claim, directory, runlog)
        else:
            outcome = _train_inline(engine, run_id, claim, directory, runlog)
    except Exception as exc:
        if cold_shutdown.is_set():
            log.warning("run %s interrupted by the worker's cold shutdown (%s)", run_id, exc)
            runlog.write_line("log", "interrupted: the worker was stopped (cold shutdown)")
            outcome = None
        else:
            log.exception("run %s failed", run_id)
            runlog.write_line("error", traceback.format_exc())
            outcome = Outcome(RunStatus.FAILED, error=error_text(exc))
    finally:
        runlog.close()
    if outcome is None:
        if cold_shutdown.is_set():
            return "interrupted"  # still running: the reaper re-queues it from its checkpoint
        log.warning("run %s was taken from this worker; not recording an outcome", run_id)
        return "lost"
    outcome = _store_spooled(engine, run_id, directory, outcome)
    _finish(engine, run_id, claim.attempt, outcome, directory)
    # A baseline of an "auto" sweep: queue its ladder now (the reconciler is the backstop).
    auto_sweep.after_run(engine, run_id)
    return outcome.status


def _nodes(engine: Engine, run_id: int) -> int:
    """How many nodes the run needs (1 for a deleted run: its claim then skips it)."""
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        return run.nodes if run is not None else 1


def _claim(engine: Engine, run_id: int, *, worker: str, task_id: str | None) -> Claim | None:
    with db.session(engine) as s:
        run = runs.claim(
            s,
            run_id,
            host=socket.gethostname(),
            gpus=registry.visible_gpus(),
            worker=worker,
            task_id=task_id,
        )
        if run is None:
            current = runs.get_run(s, run_id)
            log.info(
                "run %s: %s, not queued; skipping this delivery",
                run_id,
                "deleted" if current is None else current.status,
            )
            return None
        spec_dict, attempt, uid = dict(run.spec), run.attempts, run.uid or str(run.id)
    try:
        spec = RunSpec.model_validate(spec_dict)
    except ValidationError as exc:
        raise InvalidSpec(f"invalid spec: {format_validation_error(exc)}") from exc
    log.info("run %s: attempt %s on %s", run_id, attempt, worker)
    return Claim(spec, attempt, uid)


def _store_spooled(engine: Engine, run_id: int, directory: Path, outcome: Outcome) -> Outcome:
    """Replay the points this attempt spooled (the database refused them) before the
    final status: a run never ends with points missing. Still refused: the run fails,
    saying how many (the spool is kept; a requeue replays it). A database that is still
    down fails the status write too; the run stays running and the reaper resumes it."""
    path = directory / SPOOL_FILE
    if not path.exists():
        return outcome
    writer = metrics.MetricWriter(engine, run_id, spool=path, close_timeout=SPOOL_REPLAY_S)
    try:
        writer.close()
    except metrics.MetricWriteError as exc:
        log.error("run %s: spooled points still not stored: %s", run_id, exc)
        return Outcome(
            RunStatus.FAILED,
            error=f"{writer.pending} metric points could not be stored (kept in {path}; "
            "requeue the run to store them)",
            summary=outcome.summary,
        )
    return outcome


def _finish(
    engine: Engine, run_id: int, attempt: int, outcome: Outcome, directory: Path | None = None
) -> None:
    with db.session(engine) as s:
        finished = runs.mark_finished(
            s,
            run_id,
            outcome.status,
            attempt=attempt,
            error=outcome.error,
            diverged_step=outcome.diverged_step,
            summary=outcome.summary,
        )
        if not finished:
            run = runs.get_run(s, run_id)
            if run is None:
                log.info("run %s was deleted while training", run_id)
                if directory is not None:  # what it wrote after the API removed the folder
                    shutil.rmtree(directory, ignore_errors=True)
            else:
                log.warning(
                    "run %s is %s (attempt %s) now; not ours to finish",
                    run_id,
                    run.status,
                    run.attempts,
                )
            return
    try:  # only a speed-up for later reads; the API's maintenance loop retries
        metrics.build_overviews(engine, run_id)
    except Exception:
        log.warning("building the series overviews of run %s failed", run_id, exc_info=True)


def _outcome(result: Any) -> Outcome:
    """A ``trainer.FitResult`` (or its dict from ddp_entry) as an Outcome."""
    get = (result if isinstance(result, dict) else result.to_dict()).get
    status = get("status")
    error = get("error")
    if status not in FINAL_STATUSES:
        return Outcome(RunStatus.FAILED, error=f"trainer returned status {status!r}")
    return Outcome(
        RunStatus(status),
        error=str(error) if error else None,
        diverged_step=get("diverged_step"),
        summary=get("summary"),
    )


def _train_inline(
    engine: Engine, run_id: int, claim: Claim, directory: Path, runlog: RunLogWriter
) -> Outcome | None:
    sink = DbSink(
        engine,
        run_id,
        claim.spec,
        attempt=claim.attempt,
        spool=directory / SPOOL_FILE,
        sys_metrics=True,
    )
    try:
        with capture(runlog):
            import trainer  # torch: only here, in the process that trains

            _set_training_threads()
            result = trainer.fit(
                claim.spec,
                sink,
                run_dir=directory,
                resume=True,
                should_stop=sink.should_stop,
            )
    finally:
        sink.close()
        _release_gpu_memory()
    if sink.monitor.lost:
        return None
    return _outcome(result)


def _set_training_threads() -> None:
    """Leave a core to the sink, the API and readers (``core.settings.training_threads``)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = training_threads(get_settings().torch_threads, usable or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        log.info("training on %d CPU thread(s) of %d usable", threads, usable)


def _release_gpu_memory() -> None:
    """Give cached CUDA memory back between runs (this process may train another)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def ddp_command(run_id: int, nproc: int) -> list[str]:
    """torchrun for one run on this machine (rank 0 writes metrics)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "worker.ddp_entry",
        str(run_id),
    ]


def _train_ddp(
    engine: Engine, run_id: int, claim: Claim, directory: Path, runlog: RunLogWriter
) -> Outcome | None:
    """torchrun on this machine; rank 0 leaves the outcome in ``result.json``."""
    ended = run_torchrun(
        engine, run_id, claim.attempt, ddp_command(run_id, claim.spec.nproc), directory, runlog
    )
    if ended.lost:
        return None
    if ended.result is not None:
        return _outcome(ended.result)
    return Outcome(RunStatus.FAILED, error=ended.error)


@dataclass(frozen=True)
class TorchrunEnd:
    """How a torchrun of one attempt ended, as seen from the worker that started it."""

    returncode: int | None
    lost: bool  # the run stopped being this attempt's (finished or re-queued elsewhere)
    result: dict[str, Any] | None  # rank 0's result.json, when rank 0 ran here
    error: str  # the most telling line of a failure (see _ddp_error)
    stopped_by: str | None = None  # what ``watch`` said when it stopped the run


def run_torchrun(
    engine: Engine,
    run_id: int,
    attempt: int,
    command: list[str],
    directory: Path,
    runlog: LineWriter,
    *,
    env: dict[str, str] | None = None,
    watch: Callable[[], str | None] | None = None,
) -> TorchrunEnd:
    """Run torchrun and wait; this process heartbeats while ranks start up.

    Rank 0 writes points, progress and ``result.json``; on a cancel the ranks stop by
    themselves (they poll the same flag), and are terminated if they do not. Every
    rank's output comes through one pipe into the run's log and ``ddp.log``. ``watch``
    (a multi-node run's gang) is asked twice a second; a reason from it stops torchrun.
    """
    directory.mkdir(parents=True, exist_ok=True)
    result_path = directory / RESULT_FILE
    result_path.unlink(missing_ok=True)
    log_path = directory / DDP_LOG_FILE
    env = {**os.environ, **(env or {}), "BATCHLAB_RUN_ATTEMPT": str(attempt)}
    monitor = RunMonitor(engine, run_id, attempt=attempt)
    try:
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(
                command,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                # Its own group, so a hung torchrun goes with all its ranks; and it dies
                # with this process rather than train on as an orphan.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            assert proc.stdout is not None
            reader = threading.Thread(
                target=pump, args=(proc.stdout, runlog, log_fh), name=f"run-{run_id}-ddp-out"
            )
            reader.start()
            stopped_by = _wait_ddp(proc, monitor, watch)
            reader.join(timeout=10)  # the pipe ends with the last rank
    finally:
        monitor.close()
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return TorchrunEnd(
        returncode=proc.returncode,
        lost=monitor.lost,
        result=result,
        error="" if result is not None else _ddp_error(proc.returncode, log_path),
        stopped_by=stopped_by,
    )


def _wait_ddp(
    proc: subprocess.Popen[bytes],
    monitor: RunMonitor,
    watch: Callable[[], str | None] | None = None,
) -> str | None:
    """Wait for torchrun; stop it when the run is lost, a cancel is not obeyed in time,
    or ``watch`` gives a reason (returned)."""
    stop_since: float | None = None
    stopped_by: str | None = None
    while proc.poll() is None:
        time.sleep(0.5)
        if stopped_by is None and watch is not None:
            stopped_by = watch()
        if not (monitor.cancelled or monitor.lost or stopped_by):
            continue
        stop_since = stop_since or time.monotonic()
        if monitor.lost or stopped_by or time.monotonic() - stop_since > DDP_CANCEL_GRACE_S:
            # torchrun forwards SIGTERM to its ranks; the whole session goes if it hangs.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return stopped_by


def _ddp_error(returncode: int | None, log_path: Path) -> str:
    """The most telling line of a failed torchrun: the last exception line it logged."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        lines = []
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return f"torchrun exited with code {returncode} (log: {log_path})"
