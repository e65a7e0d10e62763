"""Metric writes (batched, idempotent, failure-safe) and reads, on SQLite and PostgreSQL."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import metrics, runs
from store.db import dispose_engines, get_engine, migrate, session
from store.metrics import MetricWriteError, MetricWriter, read_series, read_since
from store.models import MetricPoint

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
# For writer logic that never reaches backend-specific SQL (validation, retry queueing,
# cached-array slicing): a fresh PostgreSQL database per test costs ~1 s here.
SQLITE_ONLY = pytest.mark.parametrize("engine", ["sqlite"], indirect=True)


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = get_engine(url)
    migrate(eng)
    yield eng
    metrics.invalidate()
    dispose_engines()


def _new_run(engine: Engine, name: str = "r") -> int:
    with session(engine) as s:
        return runs.create_run(s, name=name, spec={"epochs": 1}).id


def _stored(engine: Engine, run_id: int, key: str | None = None) -> list[tuple]:
    q = sa.select(MetricPoint.key, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
    q = q.where(MetricPoint.run_id == run_id).order_by(MetricPoint.key, MetricPoint.step)
    if key is not None:
        q = q.where(MetricPoint.key == key)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(q)]


def _write(engine: Engine, run_id: int, values: dict[str, np.ndarray], start: int = 0) -> None:
    n = len(next(iter(values.values())))
    points = [
        (start + i, {k: float(v[i]) for k, v in values.items()}, (start + i) / 100,
         (start + i) * 0.5)
        for i in range(n)
    ]  # fmt: skip
    metrics.write_points(engine, run_id, points)


def test_background_flush_without_flush_call(engine: Engine) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id, flush_interval=0.25)
    try:
        t0 = time.monotonic()
        w.add(0, {"loss": 2.5, "lr": 0.1}, epoch=0.0, wall_time=0.1)
        while len(_stored(engine, run_id)) < 2:
            assert time.monotonic() - t0 < 2.0, "points not flushed in the background"
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"background flush took {elapsed:.2f} s"
        assert _stored(engine, run_id) == [("loss", 0, 0.0, 2.5), ("lr", 0, 0.0, 0.1)]
    finally:
        w.close()


@SQLITE_ONLY
def test_max_pending_triggers_a_write_before_the_interval(engine: Engine) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id, flush_interval=60.0, max_pending=100)
    try:
        for step in range(50):
            w.add(step, {"a": 1.0, "b": 2.0}, epoch=0.0, wall_time=0.0)
        t0 = time.monotonic()
        while w.written < 100:
            assert time.monotonic() - t0 < 2.0, f"{w.pending} points still pending"
            time.sleep(0.01)
        assert len(_stored(engine, run_id)) == 100
    finally:
        w.close()


def test_duplicates_stored_once_last_value_wins(engine: Engine) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id)
    w.add(0, {"loss": 3.0, "lr": 0.1}, epoch=0.0, wall_time=0.0)
    w.add(1, {"loss": 2.0}, epoch=0.1, wall_time=1.0)
    w.add(1, {"loss": 2.2, "val_err": 0.5}, epoch=0.1, wall_time=1.0)  # same batch, same step
    w.flush()
    # A resumed run logs steps 1.. again, in a later batch.
    w.add(1, {"loss": 1.9}, epoch=0.1, wall_time=9.0)
    w.add(2, {"loss": 1.5}, epoch=0.2, wall_time=10.0)
    w.close()
    assert _stored(engine, run_id) == [
        ("loss", 0, 0.0, 3.0), ("loss", 1, 0.1, 1.9), ("loss", 2, 0.2, 1.5),
        ("lr", 0, 0.0, 0.1), ("val_err", 1, 0.1, 0.5),
    ]  # fmt: skip


def test_concurrent_writers_and_threads(engine: Engine) -> None:
    run_ids = [_new_run(engine, f"r{i}") for i in range(3)]
    keys = [f"k{j}" for j in range(8)]
    steps = 1500
    errors: list[BaseException] = []

    def train(run_id: int) -> None:
        try:
            with MetricWriter(engine, run_id, max_pending=2000) as w:
                for step in range(steps):
                    w.add(step, dict.fromkeys(keys, float(run_id * step)), epoch=0.0,
                          wall_time=0.0)  # fmt: skip
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(r,)) for r in run_ids]
    # Several threads adding into one writer: add() must be safe to share.
    shared_run = _new_run(engine, "shared")
    shared = MetricWriter(engine, shared_run)

    def share(offset: int) -> None:
        for step in range(offset, 4000, 4):
            shared.add(step, {"x": float(step)}, epoch=0.0, wall_time=0.0)

    threads += [threading.Thread(target=share, args=(o,)) for o in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared.close()
    assert errors == []
    with engine.connect() as conn:
        counts = dict(
            conn.execute(
                sa.select(MetricPoint.run_id, sa.func.count()).group_by(MetricPoint.run_id)
            ).all()
        )
    assert counts == {**{r: steps * len(keys) for r in run_ids}, shared_run: 4000}
    assert [v for *_, v in _stored(engine, shared_run)] == [float(s) for s in range(4000)]
    last = run_ids[-1]
    assert _stored(engine, last, "k3")[-1] == ("k3", steps - 1, 0.0, float(last * (steps - 1)))


def test_non_finite_values_round_trip(engine: Engine) -> None:
    run_id = _new_run(engine)
    with MetricWriter(engine, run_id) as w:
        w.add(0, {"loss": 2.0}, epoch=0.0, wall_time=0.0)
        w.add(1, {"loss": float("inf")}, epoch=0.1, wall_time=1.0)
        w.add(2, {"loss": float("nan")}, epoch=0.2, wall_time=2.0)
        w.add(3, {"loss": -float("inf")}, epoch=0.3, wall_time=3.0)
    raw = [v for *_, v in _stored(engine, run_id)]
    assert raw[0] == 2.0 and raw[1] == math.inf and raw[3] == -math.inf
    # PostgreSQL keeps NaN; SQLite stores NaN as NULL, which the store reads back as NaN.
    assert (raw[2] is None) if engine.dialect.name == "sqlite" else math.isnan(raw[2])

    series = read_series(engine, run_id, ["loss"])["loss"]
    assert series["value"] == [2.0, None, None, None]  # JSON has no NaN / Infinity
    assert series["step"] == [0, 1, 2, 3] and series["total"] == 4
    since = read_since(engine, run_id, {"loss": 0})
    assert [(p["step"], p["value"]) for p in since] == [(1, None), (2, None), (3, None)]


@SQLITE_ONLY
def test_failed_writes_keep_points_and_are_reported(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id, flush_interval=0.05, max_retry_delay=0.1)
    real_write = w._write_rows
    fail = {"left": 3}

    def flaky(rows: list) -> None:
        if fail["left"] > 0:
            fail["left"] -= 1
            raise ConnectionError("database went away")
        real_write(rows)

    w._write_rows = flaky
    with caplog.at_level(logging.ERROR, logger="store.metrics"):
        w.add(0, {"loss": 1.0}, epoch=0.0, wall_time=0.0)
        w.add(1, {"loss": 0.9}, epoch=0.0, wall_time=0.0)
        t0 = time.monotonic()
        while w.failures < 2:  # the background thread fails, logs, and retries
            assert time.monotonic() - t0 < 3.0
            time.sleep(0.01)
        assert isinstance(w.last_error, ConnectionError)
        assert "database went away" in caplog.text and f"run {run_id}" in caplog.text
        w.add(2, {"loss": 0.8}, epoch=0.0, wall_time=0.0)
        w.close()  # retries until the database is back
    assert fail["left"] == 0
    assert [(s, v) for _, s, _, v in _stored(engine, run_id)] == [(0, 1.0), (1, 0.9), (2, 0.8)]


@SQLITE_ONLY
def test_flush_raises_and_close_gives_up_loudly(engine: Engine) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id, flush_interval=30.0, close_timeout=0.3,
                     max_retry_delay=0.05)  # fmt: skip

    def down(rows: list) -> None:
        raise ConnectionError("refused")

    real_write, w._write_rows = w._write_rows, down
    w.add(0, {"loss": 1.0, "lr": 0.1}, epoch=0.0, wall_time=0.0)
    with pytest.raises(MetricWriteError, match="2 points not written"):
        w.flush()
    assert w.pending == 2  # kept, in order, for the next attempt
    with pytest.raises(MetricWriteError, match="refused"):
        w.close()
    assert w.pending == 2
    w._write_rows = real_write
    w.flush()  # what stayed queued still goes out once the database is back
    assert len(_stored(engine, run_id)) == 2


def test_delete_while_writing_leaves_no_points(engine: Engine) -> None:
    """No foreign key on metric points: the per-batch run lock must prevent orphans."""
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id, flush_interval=0.01, max_pending=200)
    stop = threading.Event()

    def train() -> None:
        step = 0
        while not stop.is_set():
            w.add(step, {"loss": 1.0, "lr": 0.1}, epoch=0.0, wall_time=0.0)
            step += 1
            if step % 100 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=train)
    t.start()
    try:
        t0 = time.monotonic()
        while w.written < 1000:
            assert time.monotonic() - t0 < 5.0
            time.sleep(0.01)
        with session(engine) as s:
            assert runs.delete_run(s, run_id)
        time.sleep(0.1)  # batches keep coming after the delete
    finally:
        stop.set()
        t.join()
        w.close()
    assert w.dropped > 0
    assert _stored(engine, run_id) == []


@SQLITE_ONLY
def test_add_rejects_bad_input(engine: Engine) -> None:
    run_id = _new_run(engine)
    w = MetricWriter(engine, run_id)
    with pytest.raises(ValueError, match="loss"):
        w.add(0, {"loss": "high"}, epoch=0.0, wall_time=0.0)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="metric key"):
        w.add(0, {"x" * 65: 1.0}, epoch=0.0, wall_time=0.0)
    with pytest.raises(ValueError, match="max_pending"):
        MetricWriter(engine, run_id, max_pending=0)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.add(0, {"loss": 1.0}, epoch=0.0, wall_time=0.0)
    assert _stored(engine, run_id) == []


def test_read_series_keeps_extremes_first_and_last(engine: Engine) -> None:
    run_id = _new_run(engine)
    n = 20_000
    rng = np.random.default_rng(0)
    loss = 2.0 + 0.01 * rng.standard_normal(n)
    loss[7_321], loss[13_007] = 9.0, -3.0  # a spike and a dip MinMaxLTTB must keep
    _write(engine, run_id, {"loss": loss, "lr": np.linspace(0, 1, n)})
    out = read_series(engine, run_id, ["loss", "lr", "missing"], max_points=200)
    s = out["loss"]
    assert s["total"] == n and 100 <= len(s["step"]) <= 200
    assert s["step"][0] == 0 and s["step"][-1] == n - 1
    assert {7_321, 13_007} <= set(s["step"])
    assert s["step"] == sorted(s["step"])
    i = s["step"].index(7_321)
    assert s["value"][i] == 9.0 and s["epoch"][i] == 73.21 and s["wall_time"][i] == 7_321 * 0.5
    assert s["value"][-1] == loss[-1]
    assert out["missing"] == {"step": [], "epoch": [], "wall_time": [], "value": [], "total": 0}
    small = read_series(engine, run_id, ["lr"], max_points=n)["lr"]
    assert len(small["step"]) == n  # nothing to reduce
    all_keys = read_series(engine, run_id, None, max_points=50)
    assert set(all_keys) == {"loss", "lr"}
    assert read_series(engine, 999_999, ["loss"])["loss"]["total"] == 0
    with pytest.raises(ValueError, match="x"):
        read_series(engine, run_id, ["loss"], x="time")


@SQLITE_ONLY
def test_read_series_x_ranges(engine: Engine) -> None:
    run_id = _new_run(engine)
    n = 5_000
    _write(engine, run_id, {"loss": np.arange(n, dtype=float)})
    by_step = read_series(engine, run_id, ["loss"], x_min=1000, x_max=1999, max_points=100)
    s = by_step["loss"]
    assert s["total"] == 1000 and s["step"][0] == 1000 and s["step"][-1] == 1999
    assert len(s["step"]) <= 100
    by_epoch = read_series(engine, run_id, ["loss"], x="epoch", x_min=10.0, x_max=12.5)
    e = by_epoch["loss"]
    assert e["total"] == 251 and min(e["epoch"]) >= 10.0 and max(e["epoch"]) <= 12.5
    by_wall = read_series(engine, run_id, ["loss"], x="wall_time", x_min=2000.0)
    w = by_wall["loss"]
    assert w["total"] == n - 4000 and w["step"][0] == 4000 and w["step"][-1] == n - 1
    empty = read_series(engine, run_id, ["loss"], x_min=10**9)["loss"]
    assert empty["total"] == 0 and empty["step"] == []


def test_read_series_cache_follows_new_points_attempts_and_deletes(engine: Engine) -> None:
    run_id = _new_run(engine)
    _write(engine, run_id, {"loss": np.full(3000, 1.0)})
    assert read_series(engine, run_id, ["loss"])["loss"]["total"] == 3000
    _write(engine, run_id, {"loss": np.full(500, 2.0)}, start=3000)  # the run goes on
    s = read_series(engine, run_id, ["loss"])["loss"]
    assert s["total"] == 3500 and s["step"][-1] == 3499 and s["value"][-1] == 2.0

    # A resumed attempt rewrites steps the cache already holds: it must not serve old ones.
    with session(engine) as s_:
        runs.mark_running(s_, run_id, host="h", gpus="", worker="w")
    _write(engine, run_id, {"loss": np.full(600, 5.0)}, start=2900)
    s = read_series(engine, run_id, ["loss"], x_min=2900)["loss"]
    assert s["total"] == 600 and set(s["value"]) == {5.0}

    with session(engine) as s_:
        runs.delete_run(s_, run_id)
    assert read_series(engine, run_id, ["loss"])["loss"]["total"] == 0


def test_read_since_per_key_cursors_and_keys(engine: Engine) -> None:
    run_id = _new_run(engine)
    assert metrics.keys(engine, run_id) == []
    assert read_since(engine, run_id, {}) == []
    w = MetricWriter(engine, run_id, flush_interval=30.0)
    for step in range(4):
        w.add(step, {"loss": 1.0 + step, "lr": 0.1}, epoch=step / 4, wall_time=step)
    w.flush()
    assert read_since(engine, run_id, {"loss": 1, "lr": 3}) == [
        {"key": "loss", "step": 2, "epoch": 0.5, "wall_time": 2.0, "value": 3.0},
        {"key": "loss", "step": 3, "epoch": 0.75, "wall_time": 3.0, "value": 4.0},
    ]
    # The epoch-level key lands after the iteration keys of the same step.
    w.add(3, {"val_err": 0.4}, epoch=1.0, wall_time=3.5)
    w.flush()
    got = read_since(engine, run_id, {"loss": 3, "lr": 3})
    assert got == [{"key": "val_err", "step": 3, "epoch": 1.0, "wall_time": 3.5, "value": 0.4}]
    everything = read_since(engine, run_id, {})
    assert [(p["step"], p["key"]) for p in everything][:3] == [(0, "loss"), (0, "lr"), (1, "loss")]
    assert len(everything) == 9
    assert metrics.keys(engine, run_id) == ["loss", "lr", "val_err"]
    capped = read_since(engine, run_id, {}, limit_per_key=2)
    assert sorted((p["key"], p["step"]) for p in capped) == [
        ("loss", 0), ("loss", 1), ("lr", 0), ("lr", 1), ("val_err", 3)]  # fmt: skip
    w.close()


def test_finished_runs_are_read_from_their_overview(engine: Engine) -> None:
    """A finished run's views come from its stored overview: extremes, first and last point
    kept, the raw count reported, and no point rows read (they are gone in this test)."""
    run_id = _new_run(engine)
    n = 30_000
    rng = np.random.default_rng(1)
    loss = 1.0 + 0.01 * rng.standard_normal(n)
    loss[12_345] = 7.0
    _write(engine, run_id, {"loss": loss, "lr": np.linspace(1, 0, n)})
    with session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        runs.mark_finished(s, run_id, "succeeded")
    # Its writer kept live overviews; a run written before them (or by another tool) has
    # none, and the maintenance loop builds them.
    assert metrics.runs_missing_overviews(engine) == []
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM series_overviews"))
    assert metrics.runs_missing_overviews(engine) == [run_id]
    assert metrics.build_overviews(engine, run_id) == 2
    assert metrics.runs_missing_overviews(engine) == []

    with engine.begin() as conn:  # only the overview can answer now
        conn.execute(sa.delete(MetricPoint).where(MetricPoint.run_id == run_id))
    metrics.invalidate()
    s = read_series(engine, run_id, ["loss"], x="epoch", max_points=1000)["loss"]
    assert s["total"] == n and len(s["step"]) <= 1000
    assert s["step"][0] == 0 and s["step"][-1] == n - 1 and 12_345 in s["step"]
    assert s["value"][s["step"].index(12_345)] == 7.0
    assert s["epoch"][-1] == (n - 1) / 100

    # Zoomed views (an x range) and very fine ones need the points: no overview for them.
    assert read_series(engine, run_id, ["loss"], x_min=100)["loss"]["total"] == 0
    assert read_series(engine, run_id, ["loss"], max_points=8000)["loss"]["total"] == 0

    # A new attempt makes the overview stale: it is not used.
    with session(engine) as s_:
        runs.requeue(s_, run_id)
        runs.mark_running(s_, run_id, host="h", gpus="", worker="w")
        runs.mark_finished(s_, run_id, "succeeded")
    assert read_series(engine, run_id, ["loss"], max_points=500)["loss"]["total"] == 0

    with session(engine) as s_:
        runs.delete_run(s_, run_id)
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT COUNT(*) FROM series_overviews")).scalar()
    assert left == 0
