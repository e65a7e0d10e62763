"""A sweep's advice (issue 13, part 2): the baseline's critical batch from its stored
``noise_scale`` points and the measured knee, by ``trainer.advice``'s rules, on hand-made
numbers, then through ``GET /api/sweeps/{id}`` on stored points and summaries."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_api import SPEC as API_SPEC

from server.app import create_app
from store import db, metrics, runs
from trainer import advice
from trainer.advice import Outcome

# --- critical batch -----------------------------------------------------------------------


def test_last_half_keeps_the_measurements_from_half_the_last_step_on():
    steps = [0, 10, 20, 30, 40, 50, 60, 70, 80, 90]
    values = [float(v) for v in range(10)]
    # last step 90: steps >= 45 are kept
    assert advice.last_half(steps, values) == [5.0, 6.0, 7.0, 8.0, 9.0]
    # a run still training: the last half so far (last step 40 -> steps >= 20)
    assert advice.last_half(steps[:5], values[:5]) == [2.0, 3.0, 4.0]
    assert advice.last_half([], []) == []


def test_last_half_is_of_the_training_not_of_the_measurements():
    # measured at 0..40 of a run that trained to step 100: the last half starts at 50
    steps, values = [0, 10, 20, 30, 40], [1.0, 2.0, 3.0, 4.0, 5.0]
    assert advice.last_half(steps, values, last_step=100) == []
    assert advice.last_half(steps, values, last_step=60) == [4.0, 5.0]  # steps >= 30


def test_last_half_drops_non_finite_values():
    assert advice.last_half([0, 2, 4, 6], [1.0, math.nan, math.inf, 7.0]) == [7.0]
    assert advice.last_half([0, 2], [1.0, None]) == []


def test_critical_batch_pools_the_seeds_last_halves():
    series = {
        # steps 0..8: kept 4..8 -> 100, 110, 120, 130, 140
        7: (list(range(9)), [900.0, 800, 700, 600, 100, 110, 120, 130, 140]),
        # steps 0..4: kept 2..4 -> 150, 160, NaN (dropped)
        3: ([0, 1, 2, 3, 4], [1.0, 1.0, 150.0, 160.0, math.nan]),
        9: ([], []),  # a baseline with no measurement yet: not named
    }
    cb = advice.critical_batch(series)
    assert cb is not None
    pooled = [100, 110, 120, 130, 140, 150, 160]
    assert cb.points == 7 and cb.run_ids == [3, 7]
    assert cb.median == 130.0
    # linear interpolation between order statistics: position 0.25 * 6 = 1.5
    assert cb.q25 == pytest.approx(115.0) and cb.q75 == pytest.approx(145.0)
    assert statistics.median(pooled) == cb.median


def test_critical_batch_cuts_each_run_at_half_its_training():
    series = {1: ([0, 10, 20, 30], [1.0, 2.0, 3.0, 4.0]), 2: ([0, 10], [5.0, 6.0])}
    cb = advice.critical_batch(series, {1: 40, 2: 100})  # run 2 measured nothing past 50
    assert cb is not None and cb.run_ids == [1] and cb.points == 2 and cb.median == 3.5
    assert advice.critical_batch(series, {1: 100, 2: 100}) is None


def test_critical_batch_is_none_without_values():
    assert advice.critical_batch({}) is None
    assert advice.critical_batch({1: ([0, 1], [math.nan, math.nan])}) is None


# --- knee ---------------------------------------------------------------------------------


def base(err: float | None, status: str = "succeeded") -> Outcome:
    return Outcome(256, status, True, err)


def run(kn: int, err: float | None, status: str = "succeeded") -> Outcome:
    return Outcome(kn, status, False, err)


def test_knee_is_the_smallest_kn_past_mean_plus_two_std():
    rows = [
        base(0.10),
        base(0.11),
        base(0.12),  # mean 0.11, sample std 0.01: threshold 0.13
        run(64, 0.20),  # below the baseline's kn: not a knee candidate
        run(512, 0.12),
        run(512, 0.13),  # mean 0.125 <= 0.13
        run(1024, 0.13),
        run(1024, 0.14),  # mean 0.135 > 0.13
        run(2048, None, "diverged"),
        run(4096, 0.9),
    ]
    k = advice.knee(rows)
    assert k is not None
    assert k.batch_size == 1024
    assert k.baseline_mean == pytest.approx(0.11)
    assert k.baseline_std == pytest.approx(0.01)
    assert k.threshold == pytest.approx(0.13)
    assert k.metric == "val_err" and "2 std" in k.rule and "3 baseline seeds" in k.rule


def test_a_diverged_seed_puts_its_kn_past_the_knee():
    rows = [base(0.10), base(0.12), run(512, 0.10), run(512, 0.5, "diverged"), run(1024, 0.3)]
    assert advice.knee(rows).batch_size == 512  # type: ignore[union-attr]


def test_one_baseline_seed_uses_the_fixed_margin():
    rows = [base(0.10), run(512, 0.105), run(1024, 0.115)]
    k = advice.knee(rows)
    assert k is not None
    assert k.baseline_std == 0.0
    assert k.threshold == pytest.approx(0.10 + advice.KNEE_MIN_MARGIN)
    assert k.batch_size == 1024
    assert "one baseline seed" in k.rule


def test_a_tight_baseline_still_needs_the_fixed_margin():
    # two seeds agreeing to 0.001: 2 std = 0.0014 < 0.01, so 0.105 is no knee
    rows = [base(0.100), base(0.101), run(512, 0.105), run(1024, 0.2)]
    k = advice.knee(rows)
    assert k.threshold == pytest.approx(0.1005 + 0.01)  # type: ignore[union-attr]
    assert k.batch_size == 1024  # type: ignore[union-attr]


def test_only_finished_runs_count():
    rows = [
        base(0.10),
        run(512, None, "running"),
        run(512, 0.5, "failed"),
        run(1024, 0.5, "cancelled"),
        run(2048, None, "queued"),
    ]
    k = advice.knee(rows)
    assert k is not None and k.batch_size is None  # the baseline is known, no knee yet


def test_no_knee_until_the_baseline_has_finished():
    assert advice.knee([base(None, "running"), run(512, 0.9)]) is None
    assert advice.knee([base(0.1), base(None, "queued"), run(512, 0.9)]) is None
    # finished but no usable reference: failed, diverged
    assert advice.knee([base(None, "failed"), run(512, 0.9)]) is None
    assert advice.knee([base(0.2, "diverged"), run(512, 0.9)]) is None
    assert advice.knee([run(512, 0.9)]) is None
    # one seed failed, the other succeeded: that one is the reference
    k = advice.knee([base(None, "failed"), base(0.1), run(512, 0.2)])
    assert k is not None and k.batch_size == 512 and k.baseline_std == 0.0


# --- the ladder ---------------------------------------------------------------------------


def test_ladder_is_powers_of_two_from_an_eighth_to_eight_times_b():
    # log2(300) = 8.23 -> centred on 256
    assert advice.ladder(300.0, 256) == [32, 64, 128, 256, 512, 1024, 2048]
    # the baseline's kn is always in it
    assert advice.ladder(300.0, 24) == [24, 32, 64, 128, 256, 512, 1024, 2048]
    # clipped to the training set and to LADDER_MIN_BATCH
    assert advice.ladder(40.0, 32, max_batch=3200) == [8, 16, 32, 64, 128, 256]
    assert advice.ladder(300.0, 256, max_batch=1000) == [32, 64, 128, 256, 512]
    assert advice.ladder(0.3, 32) == [32]  # all below the minimum: only the baseline


@pytest.mark.parametrize("bad", [0.0, -5.0, math.nan, math.inf])
def test_ladder_refuses_a_meaningless_noise_scale(bad):
    with pytest.raises(ValueError, match="b_simple"):
        advice.ladder(bad, 256)


# --- through the API ----------------------------------------------------------------------

# test_api's spec: 3200 MNIST-1D training samples, kn = ref_batch = 32 is the baseline.
SPEC: dict[str, Any] = API_SPEC


@pytest.fixture()
def client(batchlab_home, sqlite_url, tmp_path) -> Iterator[TestClient]:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


def finish(engine: Any, run_id: int, status: str, err: float | None) -> None:
    with db.session(engine) as s:
        runs.mark_running(s, run_id, host="h", gpus="", worker="w")
        summary = None if err is None else {"final_val_err": err}
        runs.mark_finished(s, run_id, status, summary=summary)


def test_sweep_answer_carries_the_advice(client):
    body = {"spec": SPEC, "batch_sizes": [64, 128, 256], "seeds": [0, 1]}
    out = client.post("/api/sweeps", json=body).json()
    by = {(r["derived"]["total_batch"], r["spec"]["seed"]): r["id"] for r in out["runs"]}
    sweep_id, engine = out["sweep"]["id"], client.app.state.ctx.engine

    detail = client.get(f"/api/sweeps/{sweep_id}").json()
    assert detail["advice"] is None  # nothing measured, nothing finished

    # seed 0's baseline: noise_scale at steps 0..400 step 100 (400 iterations);
    # seed 1's: steps 0..200. Last halves: [40, 50, 60] and [70, 80].
    metrics.write_points(
        engine,
        by[32, 0],
        [
            (s, {"noise_scale": v, "loss": 1.0}, 0.0, 0.0)
            for s, v in zip(range(0, 401, 100), [9, 9, 40, 50, 60], strict=True)
        ],
    )
    metrics.write_points(
        engine,
        by[32, 1],
        [(s, {"noise_scale": v}, 0.0, 0.0) for s, v in [(0, 5.0), (100, 70.0), (200, 80.0)]],
    )
    # a non-baseline run's noise scale is not the prediction
    metrics.write_points(engine, by[64, 0], [(0, {"noise_scale": 1e6}, 0.0, 0.0)])
    advice_out = client.get(f"/api/sweeps/{sweep_id}").json()["advice"]
    assert advice_out["knee"] is None  # the baselines are still queued
    assert advice_out["critical_batch"] == {
        "median": 60.0,
        "q25": 50.0,
        "q75": 70.0,
        "points": 5,
        "run_ids": [by[32, 0], by[32, 1]],
    }

    finish(engine, by[32, 0], "succeeded", 0.10)
    finish(engine, by[32, 1], "succeeded", 0.12)  # mean 0.11, std 0.01414: threshold 0.13828
    finish(engine, by[64, 0], "succeeded", 0.13)
    finish(engine, by[64, 1], "succeeded", 0.14)  # mean 0.135: not past
    finish(engine, by[128, 0], "succeeded", 0.15)  # seed 1 still queued: mean 0.15, past
    finish(engine, by[256, 0], "diverged", None)
    knee = client.get(f"/api/sweeps/{sweep_id}").json()["advice"]["knee"]
    std = statistics.stdev([0.10, 0.12])
    assert knee["batch_size"] == 128
    assert knee["baseline_mean"] == pytest.approx(0.11)
    assert knee["baseline_std"] == pytest.approx(std)
    assert knee["threshold"] == pytest.approx(0.11 + 2 * std)
    assert knee["metric"] == "val_err" and "diverged" in knee["rule"]
