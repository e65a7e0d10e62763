"""Live series overviews: kept by the writer while a run trains, read instead of the points."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from store import metrics, runs
from store.db import dispose_engines, get_engine, migrate, session
from store.metrics import MetricWriter, read, read_series
from store.metrics.live import SeriesSummary
from store.metrics.overview import OVERVIEW_POINTS
from store.metrics.queries import fetch_after

BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)]
N = 120_000
SPIKE = 77_777


@pytest.fixture(params=BACKENDS)
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    eng = get_engine(url)
    migrate(eng)
    yield eng
    metrics.invalidate()
    dispose_engines()


def _loss(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    loss = 2.0 * np.exp(-t / (n / 4)) + 0.1 + 0.05 * rng.standard_normal(n)
    loss[rng.integers(0, n, 10)] += 1.5
    loss[SPIKE % n] = 9.0
    return loss


def _cols(values: np.ndarray, start: int = 0) -> dict[str, np.ndarray]:
    steps = np.arange(start, start + len(values), dtype=np.int64)
    return {"step": steps, "epoch": steps / 1000, "wall_time": steps * 0.01, "value": values}


def _running_run(engine: Engine, values: np.ndarray) -> int:
    with session(engine) as s:
        run_id = runs.create_run(s, name="live", spec={"epochs": 1}).id
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
    with MetricWriter(engine, run_id, max_pending=20_000) as w:
        for i, v in enumerate(values.tolist()):
            w.add(i, {"loss": v}, epoch=i / 1000, wall_time=i * 0.01)
    metrics.invalidate()  # a freshly started API process
    return run_id


def _count_fetched(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    fetched: list[int] = []

    def counting(conn: sa.Connection, run_id: int, key: str, after: int) -> dict:
        cols = fetch_after(conn, run_id, key, after)
        fetched.append(len(cols["step"]))
        return cols

    monkeypatch.setattr(read, "fetch_after", counting)
    monkeypatch.setattr(read.cache, "Series", _no_cache)  # the point cache is not touched
    return fetched


def _no_cache(token: int) -> None:
    raise AssertionError("the series was read through the point cache")


@pytest.mark.parametrize("chunk", [1, 7, 1000, 50_000])
def test_summary_keeps_extremes_first_last_and_fits(chunk: int) -> None:
    values = _loss(N)
    values[5_000:5_010] = np.nan  # a NaN stretch is shown; its finite neighbours still count
    values[5_011] = 30.0
    cols = _cols(values)
    summary = SeriesSummary()
    for lo in range(0, N, chunk):
        summary.extend({name: col[lo : lo + chunk] for name, col in cols.items()})
    assert summary.extend({name: col[:10] for name, col in cols.items()}) == 0  # seen steps
    snap = summary.snapshot()
    steps = snap["step"]
    assert summary.total == N and OVERVIEW_POINTS // 2 <= len(steps) <= OVERVIEW_POINTS
    assert np.all(np.diff(steps) > 0) and steps[0] == 0 and steps[-1] == N - 1
    assert np.array_equal(snap["value"], values[steps], equal_nan=True)  # real points only
    assert np.array_equal(snap["epoch"], cols["epoch"][steps])
    assert {SPIKE, 5_011, int(np.nanargmin(values))} <= set(steps.tolist())
    assert np.isnan(snap["value"]).any() and steps[np.isnan(snap["value"])][0] == 5_000


def test_summary_envelope_matches_the_series_per_bucket() -> None:
    """Each of the summary's buckets keeps its own minimum and maximum: cut the series at
    the bucket edges and every piece's extremes are in the snapshot."""
    values = _loss(N, seed=3)
    summary = SeriesSummary()
    summary.extend(_cols(values))
    kept = set(summary.snapshot()["step"].tolist())
    width = summary.width
    for lo in range(0, len(summary.buckets["step"]) * width, width):
        piece = values[lo : lo + width]
        assert {lo + int(piece.argmin()), lo + int(piece.argmax()), lo, lo + width - 1} <= kept


def test_running_run_is_read_from_its_live_overview(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _loss(N)
    run_id = _running_run(engine, values)
    # Points a writer stored after the last overview: the read adds them (exact tail).
    more = _loss(500, seed=9)
    more[123] = 12.0
    metrics.write_points(
        engine, run_id, [(N + i, {"loss": v}, (N + i) / 1000, 0.0) for i, v in enumerate(more)]
    )
    with engine.begin() as conn:  # as if the second writer died before storing its summary
        conn.execute(
            sa.text("UPDATE series_overviews SET data = :d, total = :t WHERE run_id = :r"),
            {"d": _overview_of(values), "t": N, "r": run_id},
        )
    fetched = _count_fetched(monkeypatch)
    s = read_series(engine, run_id, ["loss"], max_points=1500)["loss"]
    assert fetched == [500]  # the tail only, not the 120,500 points
    assert s["total"] == N + 500 and len(s["step"]) <= 1500
    assert s["step"][-1] == N + 499 and s["value"][-1] == more[-1]
    assert s["value"][s["step"].index(SPIKE)] == 9.0
    assert s["value"][s["step"].index(N + 123)] == 12.0
    # Zoomed reads keep reading the points, exactly.
    monkeypatch.undo()
    zoom = read_series(engine, run_id, ["loss"], x_min=1000, x_max=1999)["loss"]
    assert zoom["total"] == 1000 and zoom["value"] == values[1000:2000].tolist()


def _overview_of(values: np.ndarray) -> bytes:
    from store.metrics.overview import pack

    summary = SeriesSummary()
    summary.extend(_cols(values))
    return pack(summary.snapshot())


def test_live_read_has_the_finished_overviews_shape(engine: Engine) -> None:
    """Documented tolerance (docs/benchmarks/store.md): read to 1,500 points, the live and
    the finished overview agree on total, first and last point and the global extremes,
    and over 100 equal windows of steps their minima and maxima differ by at most 5% of
    the series' range."""
    values = _loss(N, seed=5)
    run_id = _running_run(engine, values)
    live = read_series(engine, run_id, ["loss"], max_points=1500)["loss"]
    with session(engine) as s:
        runs.mark_finished(s, run_id, "succeeded")
    metrics.build_overviews(engine, run_id)
    metrics.invalidate()
    final = read_series(engine, run_id, ["loss"], max_points=1500)["loss"]
    assert live["total"] == final["total"] == N
    for field in ("step", "value"):
        assert live[field][0] == final[field][0] and live[field][-1] == final[field][-1]
    assert max(live["value"]) == max(final["value"]) == values.max()  # the spike
    spread = values.max() - values.min()
    assert abs(min(live["value"]) - min(final["value"])) <= 0.05 * spread
    edges = np.linspace(0, N, 101)
    for series_a, series_b in ((live, final), (final, live)):
        xa, ya = np.array(series_a["step"]), np.array(series_a["value"])
        xb, yb = np.array(series_b["step"]), np.array(series_b["value"])
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            a, b = ya[(xa >= lo) & (xa < hi)], yb[(xb >= lo) & (xb < hi)]
            assert len(a) and len(b)
            assert abs(a.max() - b.max()) <= 0.05 * spread
            assert abs(a.min() - b.min()) <= 0.05 * spread


def test_a_resumed_attempt_starts_from_the_stored_points(engine: Engine) -> None:
    """A new attempt's writer summarises the points its earlier attempt stored (read once),
    and the overview of the old attempt is not used meanwhile."""
    values = _loss(30_000, seed=2)
    run_id = _running_run(engine, values[:20_000])
    with session(engine) as s:
        runs.requeue(s, run_id)
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
    with MetricWriter(engine, run_id) as w:  # resumes from a checkpoint at step 15,000
        for i in range(15_000, 30_000):
            w.add(i, {"loss": float(values[i])}, epoch=i / 1000, wall_time=i * 0.01)
    with engine.connect() as conn:
        total, attempts = conn.execute(
            sa.text("SELECT total, attempts FROM series_overviews WHERE run_id = :r"),
            {"r": run_id},
        ).one()
    assert (total, attempts) == (30_000, 2)
    s = read_series(engine, run_id, ["loss"], max_points=1000)["loss"]
    assert s["total"] == 30_000 and s["step"][-1] == 29_999 and s["step"][0] == 0
    assert s["value"][-1] == values[-1]
