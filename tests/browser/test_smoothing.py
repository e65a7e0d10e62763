"""The smoothing and seed-aggregation math of frontend/js/smoothing.js, run in Chromium
against Python references (TensorBoard's debiased EMA; numpy interpolation)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

pytestmark = pytest.mark.browser


def debiased_ema(values: list[float], s: float) -> list[float]:
    """TensorBoard's smoothing (tensorboard/.../vz_line_chart2 line-chart.ts), in Python."""
    if s <= 0:
        return list(values)
    constant = all(v == values[0] for v in values)
    last, count, out = 0.0, 0, []
    for v in values:
        if constant or not math.isfinite(v):
            out.append(v)
            continue
        last = last * s + (1 - s) * v
        count += 1
        out.append(last / (1 - s**count) if s != 1 else last)
    return out


def js(page, name: str, *args):
    return page.evaluate(
        "async ([name, args]) => (await import('/static/js/smoothing.js'))[name](...args)",
        [name, list(args)],
    )


@pytest.fixture()
def smoothing_page(page, ui):
    ui.open(page, "#/runs")
    return page


def test_debiased_ema_matches_tensorboard(smoothing_page) -> None:
    rng = random.Random(7)
    series = [math.sin(i / 9) + rng.gauss(0, 0.3) for i in range(500)]
    for s in (0.0, 0.3, 0.6, 0.9, 0.99):
        got = js(smoothing_page, "debiasedEma", series, s)
        np.testing.assert_allclose(got, debiased_ema(series, s), rtol=1e-12, atol=1e-12)
    # Debiasing: the first smoothed value is the first raw value, not (1 - s) times it.
    assert js(smoothing_page, "debiasedEma", [5.0, 7.0], 0.9)[0] == pytest.approx(5.0)


def test_ema_passes_gaps_and_constants_through(smoothing_page) -> None:
    # A JSON null (a NaN/inf point the API sent as null) stays a gap and is not counted.
    got = js(smoothing_page, "debiasedEma", [1.0, None, 3.0], 0.5)
    assert got[1] is None
    assert got[2] == pytest.approx(debiased_ema([1.0, 3.0], 0.5)[1])
    assert js(smoothing_page, "debiasedEma", [0.3] * 5, 0.8) == [0.3] * 5


def test_aggregate_seed_band_matches_numpy(smoothing_page) -> None:
    """Mean and min-max/std bands of curves on different x grids, on the densest grid."""
    a = {"x": [0, 1, 2, 3, 4, 5], "y": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]}
    b = {"x": [0.5, 2.5, 4.5], "y": [0.0, 2.0, 4.0]}
    got = js(smoothing_page, "aggregate", [a, b], "minmax")
    # Common range [0.5, 4.5] on a's grid: x = 1..4.
    assert got["x"] == [1, 2, 3, 4]
    yb = np.interp(got["x"], b["x"], b["y"])
    ya = np.interp(got["x"], a["x"], a["y"])
    np.testing.assert_allclose(got["mean"], (ya + yb) / 2)
    np.testing.assert_allclose(got["lo"], np.minimum(ya, yb))
    np.testing.assert_allclose(got["hi"], np.maximum(ya, yb))
    std = js(smoothing_page, "aggregate", [a, b], "std")
    sd = np.std(np.stack([ya, yb]), axis=0)
    np.testing.assert_allclose(std["lo"], (ya + yb) / 2 - sd)
    np.testing.assert_allclose(std["hi"], (ya + yb) / 2 + sd)
