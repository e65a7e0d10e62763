"""The Celery task ``batchlab.train_run``: one run, from its claim to its final status.

Importing this module is cheap (no torch): the task imports the trainer when it runs,
so a worker's main process stays small and forks its pool children without torch's
threads in them.

Life of a delivery:
1. claim: switch the run ``queued -> running`` in one conditional UPDATE. Anything else
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
import signal
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from celery import signals
from pydantic import ValidationError
from sqlalchemy.engine import Engine

from store import config as store_config
from store import db, metrics, runs
from store.models import Run
from trainer.spec import RunSpec
from worker import registry
from worker.celery_app import TASK_NAME, app
from worker.launch import die_with_parent
from worker.sink import DbSink, RunMonitor

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"
DDP_LOG_FILE = "ddp.log"
# After a cancel, how long torchrun's processes get to stop on their own.
DDP_CANCEL_GRACE_S = 30.0
CLAIM_RETRY_S = 5.0

signals.worker_ready.connect(registry.on_worker_ready, weak=False)
signals.worker_shutdown.connect(registry.on_worker_shutdown, weak=False)
signals.worker_process_init.connect(registry.on_process_init, weak=False)


@dataclass
class Outcome:
    """How one attempt ended, as ``mark_finished`` takes it."""

    status: str
    error: str | None = None
    diverged_step: int | None = None
    summary: dict[str, Any] | None = field(default=None)


class InvalidSpec(ValueError):
    """The stored spec no longer validates (written by another version)."""


@dataclass(frozen=True)
class Claim:
    spec: RunSpec
    attempt: int


def run_dir(run_id: int) -> Path:
    """Where a run's checkpoint lives: ``$BATCHLAB_HOME/runs/<id>`` (shared by attempts)."""
    return store_config.home() / "runs" / str(run_id)


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
        claim = _claim(engine, run_id, worker=worker, task_id=task_id)
    except sa.exc.DBAPIError as exc:
        raise ClaimFailed(error_text(exc)) from exc
    except InvalidSpec as exc:
        with db.session(engine) as s:
            runs.mark_finished(s, run_id, "failed", error=str(exc))
        return "failed"
    if claim is None:
        return "skipped"
    directory = run_dir(run_id)
    try:
        if claim.spec.nproc > 1:
            outcome = _train_ddp(engine, run_id, claim, directory)
        else:
            outcome = _train_inline(engine, run_id, claim, directory)
    except Exception as exc:
        log.exception("run %s failed", run_id)
        outcome = Outcome("failed", error=error_text(exc))
    if outcome is None:
        log.warning("run %s was taken from this worker; not recording an outcome", run_id)
        return "lost"
    _finish(engine, run_id, claim.attempt, outcome)
    return outcome.status


def _claim(engine: Engine, run_id: int, *, worker: str, task_id: str | None) -> Claim | None:
    with db.session(engine) as s:
        taken = s.execute(
            sa.update(Run)
            .where(Run.id == run_id, Run.status == "queued")
            .values(status="running")
            .execution_options(synchronize_session=False)
        )
        if taken.rowcount != 1:
            run = runs.get_run(s, run_id)
            log.info(
                "run %s: %s, not queued; skipping this delivery",
                run_id,
                "deleted" if run is None else run.status,
            )
            return None
        runs.mark_running(
            s,
            run_id,
            host=socket.gethostname(),
            gpus=registry.visible_gpus(),
            worker=worker,
            task_id=task_id,
        )
        run = runs.get_run(s, run_id)
        assert run is not None
        spec_dict, attempt = dict(run.spec), run.attempts
    try:
        spec = RunSpec.model_validate(spec_dict)
    except ValidationError as exc:
        fields = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidSpec(f"invalid spec: {fields}") from exc
    log.info("run %s: attempt %s on %s", run_id, attempt, worker)
    return Claim(spec, attempt)


def _finish(engine: Engine, run_id: int, attempt: int, outcome: Outcome) -> None:
    with db.session(engine) as s:
        run = runs.get_run(s, run_id)
        if run is None:
            log.info("run %s was deleted while training", run_id)
            return
        if run.status != "running" or run.attempts != attempt:
            log.warning(
                "run %s is %s (attempt %s) now; not ours to finish",
                run_id,
                run.status,
                run.attempts,
            )
            return
        runs.mark_finished(
            s,
            run_id,
            outcome.status,
            error=outcome.error,
            diverged_step=outcome.diverged_step,
            summary=outcome.summary,
        )
    try:  # only a speed-up for later reads; the API's maintenance loop retries
        metrics.build_overviews(engine, run_id)
    except Exception:
        log.warning("building the series overviews of run %s failed", run_id, exc_info=True)


def _outcome(result: Any) -> Outcome:
    """A ``trainer.FitResult`` (or its dict from ddp_entry) as an Outcome."""
    get = result.get if isinstance(result, dict) else lambda k: getattr(result, k, None)
    status = get("status")
    error = get("error")
    if status not in ("succeeded", "diverged", "cancelled", "failed"):
        return Outcome("failed", error=f"trainer returned status {status!r}")
    return Outcome(
        status,
        error=str(error) if error else None,
        diverged_step=get("diverged_step"),
        summary=get("summary"),
    )


def _train_inline(engine: Engine, run_id: int, claim: Claim, directory: Path) -> Outcome | None:
    sink = DbSink(engine, run_id, claim.spec, attempt=claim.attempt)
    try:
        import trainer  # torch: only here, in the process that trains

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


def _train_ddp(engine: Engine, run_id: int, claim: Claim, directory: Path) -> Outcome | None:
    """Run torchrun and wait; this process heartbeats while ranks start up.

    Rank 0 writes points, progress and ``result.json``; on a cancel the ranks stop by
    themselves (they poll the same flag), and are terminated if they do not.
    """
    directory.mkdir(parents=True, exist_ok=True)
    result_path = directory / RESULT_FILE
    result_path.unlink(missing_ok=True)
    log_path = directory / DDP_LOG_FILE
    env = {**os.environ, "BATCHLAB_RUN_ATTEMPT": str(claim.attempt)}
    monitor = RunMonitor(engine, run_id, attempt=claim.attempt)
    try:
        with log_path.open("ab") as log_fh:
            proc = subprocess.Popen(
                ddp_command(run_id, claim.spec.nproc),
                env=env,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                # Its own group, so a hung torchrun goes with all its ranks; and it dies
                # with this process rather than train on as an orphan.
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
            _wait_ddp(proc, monitor)
    finally:
        monitor.close()
    if monitor.lost:
        return None
    if result_path.exists():
        return _outcome(json.loads(result_path.read_text()))
    return Outcome("failed", error=_ddp_error(proc.returncode, log_path))


def _wait_ddp(proc: subprocess.Popen[bytes], monitor: RunMonitor) -> None:
    stop_since: float | None = None
    while proc.poll() is None:
        time.sleep(0.5)
        if not (monitor.cancelled or monitor.lost):
            continue
        stop_since = stop_since or time.monotonic()
        if monitor.lost or time.monotonic() - stop_since > DDP_CANCEL_GRACE_S:
            # torchrun forwards SIGTERM to its ranks; the whole session goes if it hangs.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


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
