"""Run / group / worker records and their API shapes, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from server.schemas import GroupOut, RunOut
from store import runs
from store.db import dispose_engines, get_engine, migrate, session
from store.metrics import MetricWriter, invalidate
from store.models import MetricPoint, Run
from trainer.spec import RunSpec


# The API shapes of store rows (server/schemas.py is their only serializer).
def run_json(run: Run) -> dict:
    return RunOut.model_validate(run).model_dump(mode="json")


def group_json(group: object) -> dict:
    return GroupOut.model_validate(group).model_dump(mode="json")


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
# Input validation happens before any SQL: one backend is enough.
SQLITE_ONLY = pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
RUN_FIELDS = {
    "id", "name", "status", "spec", "derived", "created_at", "started_at", "finished_at",
    "progress", "eta_s", "host", "gpus", "worker", "error", "diverged_step", "summary",
    "group_id", "baseline_id", "is_baseline",
}  # fmt: skip
GROUP_FIELDS = {"id", "name", "kind", "created_at", "spec", "batch_sizes", "seeds",
                "baseline_id", "run_ids", "auto_state", "auto_message"}  # fmt: skip


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = get_engine(url)
    migrate(eng)
    yield eng
    invalidate()
    dispose_engines()


def _spec(**kw: object) -> dict:
    return RunSpec(epochs=10, **kw).model_dump(mode="json")


def _parse(ts: str) -> datetime:
    assert ts.endswith("Z"), ts
    return datetime.fromisoformat(ts[:-1]).replace(tzinfo=UTC)


def test_create_list_and_run_dict(engine: Engine) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    with session(engine) as s:
        a = runs.create_run(s, name="  base ", spec=_spec(), is_baseline=True)
        b = runs.create_run(s, name="big", spec=_spec(workers=8), baseline_id=a.id)
        stale = runs.create_run(s, name="old", spec={"epochs": "many", "gone_field": 1})
    with session(engine) as s:
        assert [r.id for r in runs.list_runs(s)] == [stale.id, b.id, a.id]  # newest first
        assert [r.id for r in runs.list_runs(s, limit=1)] == [stale.id]
        runs.mark_running(s, b.id, host="h", gpus="0", worker="w")
        assert [r.id for r in runs.list_runs(s, status="running")] == [b.id]
        assert {r.id for r in runs.list_runs(s, status=["queued", "running"])} == {
            a.id, b.id, stale.id}  # fmt: skip
        d = run_json(runs.get_run(s, b.id))
        d_stale = run_json(runs.get_run(s, stale.id))
        assert runs.get_run(s, 999_999) is None

    assert set(d) >= RUN_FIELDS
    assert d["name"] == "big" and d["status"] == "running" and d["baseline_id"] == a.id
    assert d["spec"] == _spec(workers=8)
    expected = RunSpec.model_validate(_spec(workers=8)).summary_dict()
    assert d["derived"] == expected and d["derived"]["total_batch"] == 256
    assert before <= _parse(d["created_at"]) <= _parse(d["started_at"]) <= datetime.now(UTC)
    assert d["finished_at"] is None and d["progress"] == 0.0 and d["attempts"] == 1
    # A stored spec that no longer validates still lists, with no derived figures.
    assert d_stale["derived"] == {} and d_stale["spec"]["gone_field"] == 1
    assert run_json(a)["name"] == "base" and run_json(a)["is_baseline"]


def test_lifecycle_running_progress_finished(engine: Engine) -> None:
    with session(engine) as s:
        run_id = runs.create_run(s, name="r", spec=_spec()).id
    with session(engine) as s:
        runs.mark_running(s, run_id, host="box", gpus=[0, 1], worker="celery@box", task_id="t1")
        runs.set_progress(s, run_id, 0.25, 12.5)
    with session(engine) as s:
        run = runs.get_run(s, run_id)
        assert (run.status, run.host, run.gpus, run.worker, run.task_id, run.attempts) == (
            "running", "box", "0,1", "celery@box", "t1", 1)  # fmt: skip
        assert run.progress == 0.25 and run.eta_s == 12.5
        first_beat, started = run.heartbeat_at, run.started_at
        assert first_beat is not None and first_beat.tzinfo is not None
        runs.set_progress(s, run_id, 7.0, float("inf"))  # clamped, no infinite ETA
        runs.heartbeat(s, run_id)
    with session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run.progress == 1.0 and run.eta_s is None and run.heartbeat_at >= first_beat
        with pytest.raises(ValueError, match="progress"):
            runs.set_progress(s, run_id, float("nan"), None)
        # A second attempt (resume after a lost worker) counts and keeps the first start.
        runs.mark_running(s, run_id, host="box2", gpus="", worker="w2")
    with session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run.attempts == 2 and run.started_at == started and run.host == "box2"
        summary = {"final_val_err": 0.12, "loss_oscillation": float("nan")}
        runs.mark_finished(s, run_id, "diverged", error="loss blew up", diverged_step=40,
                           summary=summary)  # fmt: skip
    with session(engine) as s:
        d = run_json(runs.get_run(s, run_id))
        assert d["status"] == "diverged" and d["diverged_step"] == 40
        assert d["error"] == "loss blew up" and d["finished_at"] is not None
        assert d["summary"] == {"final_val_err": 0.12, "loss_oscillation": None}
        with pytest.raises(runs.RunStateError, match="diverged"):
            runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        with pytest.raises(ValueError, match="status"):
            runs.mark_finished(s, run_id, "done")
        for fn in (runs.heartbeat, runs.requeue):
            with pytest.raises(runs.RunNotFound, match="run 424242"):
                fn(s, 424242)
        runs.requeue(s, run_id)
    with session(engine) as s:
        run = runs.get_run(s, run_id)
        assert run.status == "queued" and run.finished_at is None and run.error is None
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        runs.mark_finished(s, run_id, "succeeded")
        assert runs.get_run(s, run_id).progress == 1.0


def test_cancel_queued_vs_running(engine: Engine) -> None:
    with session(engine) as s:
        queued = runs.create_run(s, name="q", spec=_spec()).id
        running = runs.create_run(s, name="r", spec=_spec()).id
        done = runs.create_run(s, name="d", spec=_spec()).id
        runs.mark_running(s, running, host="h", gpus="", worker="w")
        runs.mark_running(s, done, host="h", gpus="", worker="w")
        runs.mark_finished(s, done, "succeeded")
    with session(engine) as s:
        assert not runs.cancel_requested(s, queued)
        assert runs.request_cancel(s, queued).status == "cancelled"
        r = runs.request_cancel(s, running)
        assert r.status == "running" and r.cancel_requested
        assert runs.request_cancel(s, done).status == "succeeded"
        assert runs.request_cancel(s, 999_999) is None
    with session(engine) as s:
        assert runs.get_run(s, queued).finished_at is not None
        assert runs.cancel_requested(s, queued) and runs.cancel_requested(s, running)
        assert not runs.cancel_requested(s, done)
        assert runs.cancel_requested(s, 999_999)  # deleted: nothing left to train for
        # A worker that picks up a run cancelled while queued must not train it.
        with pytest.raises(runs.RunStateError):
            runs.mark_running(s, queued, host="h", gpus="", worker="w")


def test_stale_runs_and_requeue(engine: Engine) -> None:
    with session(engine) as s:
        fresh, stale, queued = (runs.create_run(s, name=n, spec=_spec()).id for n in "fsq")
        for rid in (fresh, stale):
            runs.mark_running(s, rid, host="h", gpus="", worker="w")
        old = datetime.now(UTC) - timedelta(seconds=120)
        s.execute(sa.update(Run).where(Run.id == stale).values(heartbeat_at=old))
    with session(engine) as s:
        assert [r.id for r in runs.stale_runs(s, 30)] == [stale]
        assert [r.id for r in runs.stale_runs(s, 300)] == []
        # The clock is injected: seen from 10 minutes later, both running runs are silent.
        later = datetime.now(UTC) + timedelta(seconds=600)
        assert [r.id for r in runs.stale_runs(s, 300, now=later)] == [fresh, stale]
        runs.requeue(s, stale)
    with session(engine) as s:
        assert runs.stale_runs(s, 30) == []
        assert {r.id for r in runs.list_runs(s, status="queued")} == {stale, queued}


def test_transitions_are_compare_and_set(engine: Engine) -> None:
    """Each transition applies once, from the statuses it names; a loser learns it lost."""
    with session(engine) as s:
        run_id = runs.create_run(s, name="r", spec=_spec()).id
    with session(engine) as s:
        run = runs.claim(s, run_id, host="h", gpus=[0], worker="w1", task_id="t1")
        assert (run.status, run.attempts, run.gpus, run.task_id) == ("running", 1, "0", "t1")
        # A duplicate delivery of the same message: not queued any more.
        assert runs.claim(s, run_id, host="h", gpus="", worker="w2") is None
        assert runs.running_run_of(s, "w1") == run_id and runs.running_run_of(s, "w2") is None
    later = datetime.now(UTC) + timedelta(seconds=120)
    with session(engine) as s:
        assert not runs.reap(s, run_id, 30)  # heartbeat is fresh
        assert runs.reap(s, run_id, 30, now=later)
        assert not runs.reap(s, run_id, 30, now=later)  # a second reaper
        run = runs.get_run(s, run_id)
        assert (run.status, run.heartbeat_at) == ("queued", None)
        # The re-send failed: running again with the old heartbeat, for the next reap.
        old_beat = datetime.now(UTC) - timedelta(seconds=90)
        assert runs.undo_requeue(s, run_id, heartbeat_at=old_beat)
        assert not runs.undo_requeue(s, run_id, heartbeat_at=old_beat)
        assert [r.id for r in runs.stale_runs(s, 30)] == [run_id]
        assert runs.reap(s, run_id, 30)
        assert runs.claim(s, run_id, host="h", gpus="", worker="w2").attempts == 2
    with session(engine) as s:
        # The first attempt's worker comes back: the run is not its to finish any more.
        assert not runs.mark_finished(s, run_id, "succeeded", attempt=1)
        assert runs.mark_finished(s, run_id, "succeeded", attempt=2, summary={"a": 1.0})
        assert not runs.mark_finished(s, run_id, "failed")  # final stays final
        assert not runs.reap(s, run_id, 30, fail_with="lost", now=later)
        run = runs.get_run(s, run_id)
        assert (run.status, run.summary, run.progress) == ("succeeded", {"a": 1.0}, 1.0)
        assert not runs.mark_finished(s, 424242, "failed")
        runs.requeue(s, run_id)
        runs.mark_running(s, run_id, host="h", gpus="", worker="w3")
        assert runs.reap(s, run_id, 30, fail_with="WorkerLost: gone", now=later)
        run = runs.get_run(s, run_id)
        assert (run.status, run.error) == ("failed", "WorkerLost: gone")
        assert run.finished_at is not None


def test_groups_with_runs_and_baseline(engine: Engine) -> None:
    with session(engine) as s:
        g = runs.create_group(s, name="sweep 1", kind="sweep", spec=_spec(),
                              batch_sizes=[256, 1024], seeds=[0, 1])  # fmt: skip
        base = runs.create_run(s, name="b", spec=_spec(), group_id=g.id, is_baseline=True)
        big = runs.create_run(s, name="x", spec=_spec(workers=32), group_id=g.id,
                              baseline_id=base.id)  # fmt: skip
        inside = group_json(g)  # current within the creating session
        cmp_group = runs.create_group(s, name="cmp", kind="compare")
        runs.create_run(s, name="y", spec=_spec(), group_id=cmp_group.id, baseline_id=base.id)
    assert inside["run_ids"] == [base.id, big.id] and inside["baseline_id"] == base.id
    with session(engine) as s:
        g2 = runs.get_group(s, g.id)
        groups = runs.list_groups(s)
        assert [r.id for r in runs.list_runs(s, group_id=g.id)] == [big.id, base.id]
    d = group_json(g2)  # after the session closed
    assert set(d) == GROUP_FIELDS
    assert d["kind"] == "sweep" and d["batch_sizes"] == [256, 1024] and d["seeds"] == [0, 1]
    assert d["run_ids"] == [base.id, big.id] and d["baseline_id"] == base.id
    assert d["created_at"].endswith("Z")
    assert [x.id for x in groups] == [cmp_group.id, g.id]
    # A comparison without its own baseline run points at the one its runs share.
    assert group_json(groups[0])["baseline_id"] == base.id
    with session(engine) as s:
        assert runs.get_group(s, 999) is None


def test_workers_upsert(engine: Engine) -> None:
    with session(engine) as s:
        run_id = runs.create_run(s, name="r", spec=_spec()).id
        runs.record_worker(s, name="celery@a-gpu0", host="a", gpus=[0], queues=["gpu"])
    with session(engine) as s:
        first = runs.list_workers(s)[0].last_seen
        runs.record_worker(s, name="celery@a-gpu0", host="a", gpus="0", queues=["gpu", "gpu1"],
                           active_run_id=run_id)  # fmt: skip
        runs.record_worker(s, name="celery@a-cpu", host="a", gpus="", queues=["cpu"])
    with session(engine) as s:
        ws = [runs.worker_to_dict(w) for w in runs.list_workers(s)]
    assert [w["name"] for w in ws] == ["celery@a-cpu", "celery@a-gpu0"]
    assert ws[1]["queues"] == ["gpu", "gpu1"] and ws[1]["active"] == run_id
    assert ws[1]["gpus"] == "0" and _parse(ws[1]["last_seen"]) >= first


def test_delete_run_removes_points_and_references(engine: Engine) -> None:
    with session(engine) as s:
        base = runs.create_run(s, name="b", spec=_spec(), is_baseline=True).id
        other = runs.create_run(s, name="o", spec=_spec(), baseline_id=base).id
        runs.record_worker(s, name="w", host="h", gpus="", queues=["cpu"], active_run_id=base)
    for rid in (base, other):
        with MetricWriter(engine, rid) as w:
            for step in range(50):
                w.add(step, {"loss": 1.0, "lr": 0.1}, epoch=step / 10, wall_time=step)

    def points(rid: int) -> int:
        with session(engine) as s:
            q = sa.select(sa.func.count()).where(MetricPoint.run_id == rid)
            return s.scalar(q)

    assert points(base) == points(other) == 100
    with session(engine) as s:
        assert runs.delete_run(s, base) is True
    with session(engine) as s:
        assert runs.get_run(s, base) is None and runs.delete_run(s, base) is False
        assert runs.get_run(s, other).baseline_id is None
        assert runs.list_workers(s)[0].active_run_id is None
    assert points(base) == 0 and points(other) == 100
    # Ids are never handed out again, so nothing keyed by an old id can see a new run.
    with session(engine) as s:
        assert runs.create_run(s, name="n", spec=_spec()).id > other


@SQLITE_ONLY
def test_bad_input_names_the_field(engine: Engine) -> None:
    with session(engine) as s:
        with pytest.raises(ValueError, match="name"):
            runs.create_run(s, name=" ", spec={})
        with pytest.raises(ValueError, match="spec"):
            runs.create_run(s, name="x", spec=[1, 2])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="group_id"):
            runs.create_run(s, name="x", spec={}, group_id=12345)
        with pytest.raises(ValueError, match="baseline_id"):
            runs.create_run(s, name="x", spec={}, baseline_id=12345)
        with pytest.raises(ValueError, match="kind"):
            runs.create_group(s, name="g", kind="grid")
        with pytest.raises(ValueError, match="status"):
            runs.list_runs(s, status="finished")
    with session(engine) as s:
        assert runs.list_runs(s) == [] and runs.list_groups(s) == []


def test_times_are_utc_z() -> None:
    assert runs.iso(datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)) == (
        "2026-01-02T03:04:05.678Z")  # fmt: skip
    berlin = datetime(2026, 1, 2, 4, 4, 5, tzinfo=UTC).astimezone(ZoneInfo("Europe/Berlin"))
    assert runs.iso(berlin) == "2026-01-02T04:04:05.000Z"
    assert runs.iso(None) is None
