"""Crash recovery: a worker killed mid-run, ``reap_stale``, resume from the checkpoint.

The end-to-end test kills a real Celery worker with SIGKILL (worker and pool child at
once) after the first epoch checkpoint, re-queues the run with ``reap_stale`` and lets a
second worker finish it. It then proves that no point was lost or duplicated, and that
the second attempt resumed from the checkpoint instead of starting over: the points of
the epochs before the checkpoint are the very rows the first attempt wrote.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_worker import (
    PER_ITER,
    WorkerProcess,
    assert_complete,
    create_run,
    get_run,
    point_counts,
    tiny_spec,
    wait_for,
    worker_env,
)

from store import db, runs
from store.models import MetricPoint, Run, utcnow
from worker.recovery import reap_stale


def _engine(url: str) -> sa.Engine:
    engine = db.get_engine(url)
    db.migrate(engine)
    return engine


def _make_stale(engine: sa.Engine, run_id: int, *, attempts: int, age_s: float = 120) -> None:
    """A run some worker started ``attempts`` times and last heard of ``age_s`` ago."""
    with db.session(engine) as s:
        for _ in range(attempts):
            runs.mark_running(s, run_id, host="gone-host", gpus="0", worker="gpu0@gone-host")
        s.execute(
            sa.update(Run)
            .where(Run.id == run_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=age_s))
        )


class Recorder:
    """An enqueue function that records what it was asked to send."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[int] = []
        self.fail = fail

    def __call__(self, run_id: int, spec: object) -> str:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.sent.append(run_id)
        return "task-id"


def test_reap_requeues_once_and_spares_live_runs(sqlite_url: str) -> None:
    engine = _engine(sqlite_url)
    stale = create_run(engine, tiny_spec())
    _make_stale(engine, stale, attempts=1)
    live = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        runs.mark_running(s, live, host="h", gpus="", worker="w")  # heartbeat: now
    queued = create_run(engine, tiny_spec())
    send = Recorder()
    assert reap_stale(engine, older_than_s=30, enqueue=send) == [stale]
    assert send.sent == [stale]
    assert get_run(engine, stale).status == "queued"
    assert get_run(engine, live).status == "running"
    assert get_run(engine, queued).status == "queued"
    # A second reaper (the API and a starting worker) finds nothing left to do.
    assert reap_stale(engine, older_than_s=30, enqueue=send) == []
    assert send.sent == [stale]


def test_reap_fails_a_run_after_max_attempts(sqlite_url: str) -> None:
    engine = _engine(sqlite_url)
    run_id = create_run(engine, tiny_spec())
    _make_stale(engine, run_id, attempts=2)
    send = Recorder()
    assert reap_stale(engine, older_than_s=30, max_attempts=2, enqueue=send) == [run_id]
    assert send.sent == []
    run = get_run(engine, run_id)
    assert run.status == "failed" and run.finished_at is not None
    assert run.error == (
        "WorkerLost: no heartbeat for over 30 s from worker gpu0@gone-host on gone-host; "
        "gave up after 2 attempts"
    )


def test_reap_retries_when_the_broker_is_down(sqlite_url: str) -> None:
    engine = _engine(sqlite_url)
    run_id = create_run(engine, tiny_spec())
    _make_stale(engine, run_id, attempts=1)
    assert reap_stale(engine, older_than_s=30, enqueue=Recorder(fail=True)) == []
    # Not left queued without a message: still running and stale, so the next reap
    # (broker back) re-queues it.
    assert get_run(engine, run_id).status == "running"
    send = Recorder()
    assert reap_stale(engine, older_than_s=30, enqueue=send) == [run_id]
    assert send.sent == [run_id] and get_run(engine, run_id).status == "queued"


def test_reap_sends_a_real_message(sqlite_url: str, tmp_path: Path) -> None:
    from worker.celery_app import make_app, queue_lengths

    engine = _engine(sqlite_url)
    run_id = create_run(engine, tiny_spec())
    _make_stale(engine, run_id, attempts=1)
    app = make_app(f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    assert reap_stale(engine, older_than_s=30, celery_app=app) == [run_id]
    assert queue_lengths(["cpu", "gpu"], celery_app=app) == {"cpu": 1, "gpu": 0}


def test_reap_measures_silence_at_the_given_time(sqlite_url: str) -> None:
    engine = _engine(sqlite_url)
    run_id = create_run(engine, tiny_spec())
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")  # heartbeat: now
    send = Recorder()
    later = utcnow() + timedelta(seconds=31)
    assert reap_stale(engine, older_than_s=60, enqueue=send, now=later) == []
    assert reap_stale(engine, older_than_s=30, enqueue=send, now=later) == [run_id]
    assert send.sent == [run_id] and get_run(engine, run_id).status == "queued"


def test_reap_rejects_bad_arguments(sqlite_url: str) -> None:
    engine = _engine(sqlite_url)
    with pytest.raises(ValueError, match="older_than_s"):
        reap_stale(engine, older_than_s=0)
    with pytest.raises(ValueError, match="max_attempts"):
        reap_stale(engine, max_attempts=0)


def _rows(engine: sa.Engine, run_id: int, below_step: int) -> list[tuple]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.select(
                    MetricPoint.key, MetricPoint.step, MetricPoint.wall_time, MetricPoint.value
                )
                .where(MetricPoint.run_id == run_id, MetricPoint.step < below_step)
                .order_by(MetricPoint.key, MetricPoint.step)
            )
        ]


@pytest.mark.slow
def test_killed_worker_run_resumes_from_checkpoint(tmp_path: Path) -> None:
    from worker.celery_app import enqueue, make_app

    home = tmp_path / "home"
    home.mkdir()
    engine = _engine(f"sqlite:///{home / 'batchlab.db'}")
    app = make_app(f"sqla+sqlite:///{home / 'broker.db'}")
    env = worker_env(home)
    # Two workers on the queue; one takes the run and is killed, the other finishes it.
    workers = {
        name: WorkerProcess.celery(env, tmp_path / f"{name}.log", name=f"{name}@%h")
        for name in ("a", "b")
    }
    try:
        spec = tiny_spec(epochs=8, batch_per_worker=5)  # 80 iterations an epoch
        ipe = spec.iters_per_epoch
        run_id = create_run(engine, spec)
        enqueue(run_id, spec, celery_app=app)
        # Kill once two epochs are stored. The sink stores an epoch's points before the
        # trainer writes that epoch's checkpoint, so with k epochs stored the checkpoint
        # on disk is of epoch k-1 or k: every step below (k-1)*ipe precedes it.
        deadline = time.monotonic() + 60
        while point_counts(engine, run_id).get("val_err", 0) < 2:
            assert time.monotonic() < deadline, "two epochs not stored after 60 s"
            time.sleep(0.01)
        first = get_run(engine, run_id)
        victim = workers[first.worker.split("@")[0]]
        victim.kill()
        counts = point_counts(engine, run_id)
        assert counts["loss"] < spec.total_iters, "the run ended before it was killed"
        assert (home / "runs" / str(first.uid) / "checkpoint.pt").exists()
        before_ckpt = (counts["val_err"] - 1) * ipe
        assert counts["loss"] >= before_ckpt  # nothing before the checkpoint is missing
        before = _rows(engine, run_id, before_ckpt)
        assert get_run(engine, run_id).status == "running"

        # The killed worker's heartbeat, seen from a minute later: stale, without waiting.
        later = utcnow() + timedelta(seconds=60)
        assert reap_stale(engine, older_than_s=30, celery_app=app, now=later) == [run_id]
        run = wait_for(engine, run_id, ("succeeded", "failed", "diverged"), 60, workers["b"])
        assert run.status == "succeeded", run.error
        assert run.attempts == 2 and run.worker != first.worker
        # No point lost, none duplicated...
        assert_complete(engine, run_id, spec)
        # ...and the second attempt resumed: the rows before the checkpoint are still the
        # first attempt's (same wall times), not rewritten by a restart from step 0.
        assert len(before) >= ipe * len(PER_ITER)
        assert _rows(engine, run_id, before_ckpt) == before
    finally:
        for w in workers.values():
            w.stop()
