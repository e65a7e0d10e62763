"""Metric points survive a database outage (issue 10, point 1).

Writes are made to fail (an injected OperationalError) across an epoch end: the points
are spooled to the run's folder before the checkpoint, replayed when the database is
back, stored exactly once; a database that never comes back fails the run, with the count.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from test_worker import create_run, get_run, point_counts, tiny_spec

from store import db, runs
from store.metrics import MetricWriter
from store.metrics import writer as writer_module
from worker.sink import SPOOL_FILE, DbSink


class Outage:
    """Makes every metric write fail while ``down`` is set."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        self.refused = 0
        real = MetricWriter._write_rows
        outage = self

        def write_rows(writer: MetricWriter, rows: list) -> None:
            if outage.down:
                outage.refused += 1
                raise sa.exc.OperationalError("INSERT", {}, Exception("database is down"))
            real(writer, rows)

        monkeypatch.setattr(MetricWriter, "_write_rows", write_rows)


@pytest.fixture()
def outage(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outage]:
    monkeypatch.setattr(writer_module, "CLOSE_TIMEOUT_S", 0.5)
    yield Outage(monkeypatch)


def log_epoch(sink: DbSink, epoch: int, ipe: int) -> None:
    """What the trainer logs in one epoch: per-iteration points, then the epoch's own."""
    for i in range(ipe):
        step = epoch * ipe + i
        values = {"loss": 1.0 / (step + 1), "lr": 0.1}
        sink.log(step, values, epoch=(step + 1) / ipe, wall_time=step)
    last = (epoch + 1) * ipe - 1
    sink.log(last, {"val_err": 0.5, "epoch_time": 1.0}, epoch=float(epoch + 1), wall_time=last)


def stored_rows(engine: sa.Engine, run_id: int) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text("SELECT key, step FROM metric_points WHERE run_id = :r ORDER BY key, step"),
                {"r": run_id},
            )
        ]


def test_points_spooled_at_an_outage_survive_the_worker(
    sqlite_url: str, tmp_path: Path, outage: Outage
) -> None:
    """The database is down at an epoch end and the worker dies before it is back (the
    checkpoint is past the points): the next writer of the run replays the spool."""
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec()
    run_id, ipe = create_run(engine, spec), spec.iters_per_epoch
    spool = tmp_path / "run" / SPOOL_FILE
    sink = DbSink(engine, run_id, spec, spool=spool)
    log_epoch(sink, 0, ipe)  # stored
    outage.down = True
    log_epoch(sink, 1, ipe)  # refused at the epoch end: spooled before the checkpoint
    assert spool.exists() and outage.refused > 0
    assert point_counts(engine, run_id)["loss"] == ipe
    sink.monitor.close()  # the worker dies here: its writer's queue is gone
    sink.writer._stop.set()

    outage.down = False
    with MetricWriter(engine, run_id, spool=spool) as attempt2:  # the resumed attempt
        attempt2.add(2 * ipe, {"loss": 0.1}, epoch=2 + 1 / ipe, wall_time=99.0)
    expected = {"loss": 2 * ipe + 1, "lr": 2 * ipe, "val_err": 2, "epoch_time": 2}
    assert point_counts(engine, run_id) == expected
    rows = stored_rows(engine, run_id)
    assert len(rows) == len(set(rows)) == sum(expected.values())
    assert not spool.exists()


def test_outage_across_an_epoch_end_then_recovery_stores_every_point_once(
    sqlite_url: str, tmp_path: Path, outage: Outage
) -> None:
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec()
    run_id, ipe = create_run(engine, spec), spec.iters_per_epoch
    spool = tmp_path / "run" / SPOOL_FILE
    sink = DbSink(engine, run_id, spec, spool=spool)
    outage.down = True
    log_epoch(sink, 0, ipe)
    log_epoch(sink, 1, ipe)  # two epoch ends in the outage: the spool only grows
    assert spool.exists()
    outage.down = False
    log_epoch(sink, 2, ipe)
    sink.close()
    assert sink.unstored == 0 and not spool.exists()
    assert point_counts(engine, run_id) == {
        "loss": 3 * ipe,
        "lr": 3 * ipe,
        "val_err": 3,
        "epoch_time": 3,
    }
    rows = stored_rows(engine, run_id)
    assert len(rows) == len(set(rows))


def _run_task(engine: sa.Engine, run_id: int) -> str:
    from worker.tasks import execute

    return execute(engine, run_id, worker="w")


def test_a_run_whose_points_come_back_after_an_outage_succeeds(
    batchlab_home: str, sqlite_url: str, outage: Outage, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real task and trainer: writes fail until the first spool, then recover."""
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec()
    run_id = create_run(engine, spec)
    real_spool = MetricWriter.spool_pending

    def spool_then_recover(writer: MetricWriter) -> int:
        added = real_spool(writer)
        outage.down = False
        return added

    monkeypatch.setattr(MetricWriter, "spool_pending", spool_then_recover)
    outage.down = True
    assert _run_task(engine, run_id) == "succeeded"
    assert outage.refused > 0
    counts = point_counts(engine, run_id)
    assert counts["loss"] == spec.total_iters and counts["val_err"] == spec.epochs
    run = get_run(engine, run_id)
    assert not (runs.run_dir(str(run.uid)) / SPOOL_FILE).exists()


def test_a_database_that_never_takes_the_points_fails_the_run_with_the_count(
    batchlab_home: str, sqlite_url: str, outage: Outage, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.tasks

    monkeypatch.setattr(worker.tasks, "SPOOL_REPLAY_S", 0.5)
    engine = db.get_engine(sqlite_url)
    db.migrate(engine)
    spec = tiny_spec(noise_every=0, health_every=0)  # the key count below is exact
    run_id = create_run(engine, spec)
    outage.down = True  # metric writes only: the status write still works
    assert _run_task(engine, run_id) == "failed"
    run = get_run(engine, run_id)
    assert run.status == "failed" and point_counts(engine, run_id) == {}
    assert run.error is not None and "metric points could not be stored" in run.error
    missing = int(run.error.split()[0])
    per_iter, per_epoch = 6, 7  # trainer keys: loss ... step_time; val_loss ... train_err_epoch
    assert missing == spec.total_iters * per_iter + spec.epochs * per_epoch
    # Nothing is thrown away: the spool keeps them for a requeue.
    assert (runs.run_dir(str(run.uid)) / SPOOL_FILE).exists()
