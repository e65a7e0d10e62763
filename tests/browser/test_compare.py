"""The compare view: the baseline in black under the others, seeds as mean + band, the
LR panel on the shared x axis, the paper's legends, URL state, and zoom re-fetching."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


def chart_data(page) -> list[dict]:
    return page.evaluate(
        """() => document.getElementById('compare-chart').data.map((t) => ({
            name: t.name, color: t.line && t.line.color, meta: t.meta || {}, fill: t.fill,
            yaxis: t.yaxis || 'y', x: Array.from(t.x), showlegend: t.showlegend}))"""
    )


def curves(traces: list[dict]) -> list[dict]:
    """The visible curves (not faint raw copies, bands or the LR panel)."""
    return [
        t
        for t in traces
        if t["yaxis"] == "y" and not t["meta"].get("raw") and not t["meta"].get("band") and t["x"]
    ]


@pytest.fixture(scope="module")
def figure_runs(service, ui) -> dict[str, object]:
    """Figure 2 of the paper in small: a 2-seed kn=256 baseline, kn=8k and kn=1k gradual."""
    from store import db, runs

    with db.session(service.engine) as s:
        group = runs.create_group(s, name="figure 2", kind="compare").id
    base = [
        ui.seed_run(
            service.engine,
            name=f"baseline seed {sd}",
            group_id=group,
            is_baseline=True,
            spec=ui.full_spec(workers=8, warmup="none", seed=sd),
            final_err=0.20 + 0.01 * sd,
        )
        for sd in (0, 1)
    ]
    big = ui.seed_run(
        service.engine,
        name="kn=8k gradual",
        group_id=group,
        baseline_id=base[0],
        spec=ui.full_spec(workers=256),
        final_err=0.21,
    )
    mid = ui.seed_run(
        service.engine,
        name="kn=1k gradual",
        group_id=group,
        baseline_id=base[0],
        spec=ui.full_spec(workers=32),
        final_err=0.205,
    )
    return {"group": group, "base": base, "big": big, "mid": mid}


def test_baseline_black_others_coloured(page, figure_runs, ui) -> None:
    base, big, mid = figure_runs["base"], figure_runs["big"], figure_runs["mid"]
    ui.open(page, f"#/compare?runs={base[0]},{base[1]},{big},{mid}&baseline={base[0]}")
    ui.wait_drawn(page, "compare")
    traces = chart_data(page)
    shown = curves(traces)
    baseline = [t for t in shown if t["meta"].get("baseline")]
    others = [t for t in shown if not t["meta"].get("baseline")]
    # One baseline curve (its two seeds averaged), black; the others distinct colours.
    assert len(baseline) == 1 and baseline[0]["color"] == "#111111"
    assert sorted(baseline[0]["meta"]["runs"]) == sorted(base)
    assert len(others) == 2
    assert len({t["color"] for t in others}) == 2 and "#111111" not in {t["color"] for t in others}
    # The seeds' band (min-max) exists for the baseline only.
    bands = [t for t in traces if t["fill"] == "tonexty" and t["meta"].get("band")]
    assert len(bands) == 1 and bands[0]["meta"]["baseline"]
    # Legends as in the paper, plus the final validation error.
    names = {t["name"] for t in shown}
    assert any(n.startswith("kn=8k, η=3.2, gradual warmup: 23.00%") for n in names), names
    assert any(n.startswith("kn=1k, η=0.4, gradual") for n in names), names
    assert any(n.startswith("kn=256, η=0.1, no warmup") and "(2 seeds)" in n for n in names)
    # Per epoch by default, training error in %, LR below on the same x axis.
    layout = page.evaluate("document.getElementById('compare-chart').layout")
    assert layout["xaxis"]["title"]["text"] == "epoch"
    assert layout["yaxis"]["title"]["text"] == "training error (%)"
    lr = [t for t in traces if t["yaxis"] == "y2"]
    assert len(lr) == 3 and all(t["x"][-1] == pytest.approx(10) for t in lr)
    assert max(max(t["x"]) for t in shown) == pytest.approx(10)
    # The table below lists the configurations, baseline first.
    first_row = page.locator(".compare-view tbody tr").first
    assert "baseline" in first_row.inner_text()


def test_controls_live_in_the_url(page, figure_runs, ui) -> None:
    base, big = figure_runs["base"], figure_runs["big"]
    ui.open(page, f"#/compare?runs={base[0]},{base[1]},{big}&baseline={base[0]}&smooth=0")
    ui.wait_drawn(page, "compare")
    assert not [t for t in chart_data(page) if t["meta"].get("raw")]  # no smoothing: no raw
    page.select_option("select[name=x]", "step")
    ui.wait_drawn(page, "compare", 2)
    assert "x=step" in page.url
    layout = page.evaluate("document.getElementById('compare-chart').layout")
    assert layout["xaxis"]["title"]["text"] == "iteration"
    page.select_option("select[name=x]", "samples")
    ui.wait_drawn(page, "compare", 3)
    big_curve = next(t for t in curves(chart_data(page)) if t["meta"].get("run") == big)
    assert big_curve["x"][-1] == 20 * 8192  # 20 iterations of k*n = 8192 samples
    page.select_option("select[name=x]", "step")
    ui.wait_drawn(page, "compare", 4)
    page.select_option("select[name=band]", "off")
    ui.wait_drawn(page, "compare", 5)
    seeds = [t for t in curves(chart_data(page)) if t["meta"].get("baseline")]
    assert sorted(t["meta"]["run"] for t in seeds) == sorted(base)  # each seed its own line
    page.locator("input[name=smooth]").fill("0.8")
    ui.wait_drawn(page, "compare", 6)
    assert "smooth=0.8" in page.url and "band=off" in page.url
    assert [t for t in chart_data(page) if t["meta"].get("raw")]  # raw curves faint beneath
    # The link reproduces the view: mounted again from the URL alone.
    url = page.url
    ui.open(page, url[url.index("#") :])
    ui.wait_drawn(page, "compare")
    assert page.locator("select[name=x]").input_value() == "step"
    assert page.locator("select[name=band]").input_value() == "off"


def test_open_a_group(page, figure_runs, ui) -> None:
    ui.open(page, f"#/compare?group={figure_runs['group']}")
    ui.wait_drawn(page, "compare")
    assert page.locator("select[name=baseline]").input_value() == str(figure_runs["base"][0])
    assert len(curves(chart_data(page))) == 3


def test_zoom_rereads_the_visible_range_in_full(page, seed, ui) -> None:
    # 5120 iterations: the first read is downsampled to about 1500 points.
    long = seed(name="long run", spec=ui.full_spec(workers=1, warmup="none"))
    ui.open(page, f"#/compare?runs={long}&x=step&smooth=0")
    ui.wait_drawn(page, "compare")
    before = [t for t in curves(chart_data(page))][0]["x"]
    assert len(before) <= 1500 and before[-1] == 5119
    assert len([x for x in before if 1000 <= x <= 1800]) < 801
    page.evaluate(
        "((el) => (el.__plotly || Plotly).relayout(el, "
        "{'xaxis.range[0]': 1000, 'xaxis.range[1]': 1800}))"
        "(document.getElementById('compare-chart'))"
    )
    ui.wait_drawn(page, "compare", 2)  # drawn again once the range is re-read
    assert "xr=1000,1800" in page.url
    after = [t for t in curves(chart_data(page))][0]["x"]
    assert set(range(1000, 1801)) <= set(after)  # every iteration in view


def test_legend_clears_the_toolbar_and_the_curves(page, figure_runs, ui) -> None:
    """Issue 12.7: at 1440 px the legend ran under Plotly's toolbar; it sits below now."""
    base, big, mid = figure_runs["base"], figure_runs["big"], figure_runs["mid"]
    ui.open(page, f"#/compare?runs={base[0]},{base[1]},{big},{mid}&baseline={base[0]}")
    ui.wait_drawn(page, "compare")
    chart = page.locator("#compare-chart")
    chart.hover()  # the toolbar shows on hover
    legend = chart.locator(".legend").bounding_box()
    toolbar = chart.locator(".modebar").bounding_box()
    plot = chart.locator(".xy2 .nsewdrag, .xy .nsewdrag").last.bounding_box()
    assert legend["y"] > toolbar["y"] + toolbar["height"]
    assert legend["y"] >= plot["y"] + plot["height"]  # beneath the curves and the LR panel
    box = page.locator("#compare-chart").bounding_box()
    assert legend["y"] + legend["height"] <= box["y"] + box["height"] + 2  # inside the chart
