"""One compare figure: the dashboard (compare.js in Chromium) and the notebook
(``Client.compare_figure``) draw the same runs as the same traces, both from
frontend/figure_spec.json. Any drift of either side (a colour, a width, a label rule, the
EMA, the seed band) fails here."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

import batchlab

pytestmark = pytest.mark.browser

# Trace attributes both renderers set; "legendgroup" and meta.group are compared by order
# (the group key is a JSON text, and JS writes 5.0 as 5).
KEYS = ("name", "type", "mode", "showlegend", "yaxis", "line", "marker", "fill", "fillcolor",
        "hoverinfo", "hovertemplate")  # fmt: skip
VIEWS = [
    {"key": "train_err", "x": "epoch", "smooth": 0.6, "band": "minmax"},
    {"key": "loss", "x": "samples", "smooth": 0.3, "band": "std"},
    {"key": "val_err", "x": "step", "smooth": 0.0, "band": "off"},
]


@pytest.fixture(scope="module")
def parity_runs(service, ui) -> dict[str, Any]:
    """A 2-seed baseline, kn=8k gradual (5 epochs), kn=1k constant warmup (2 epochs) with
    a target accuracy: warmup_epochs differs only where warmup has an effect."""
    spec = ui.full_spec
    base = [
        ui.seed_run(
            service.engine,
            name=f"parity baseline {sd}",
            is_baseline=True,
            spec=spec(workers=8, warmup="none", warmup_epochs=5, seed=sd),
            final_err=0.2 + 0.01 * sd,
        )
        for sd in (0, 1)
    ]
    big = ui.seed_run(
        service.engine, name="parity 8k", spec=spec(workers=256, warmup_epochs=5), final_err=0.23
    )
    mid = ui.seed_run(
        service.engine,
        name="parity 1k <constant>",
        spec=spec(workers=32, warmup="constant", warmup_epochs=2, target_accuracy=0.5),
        final_err=0.21,
    )
    return {"ids": [*base, big, mid], "baseline": base[0]}


def browser_figure(page, ui, runs: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
    ids = ",".join(map(str, runs["ids"]))
    query = "&".join(f"{k}={v}" for k, v in view.items())
    ui.open(page, f"#/compare?runs={ids}&baseline={runs['baseline']}&{query}")
    ui.wait_drawn(page, "compare")
    return page.evaluate(
        """() => { const gd = document.getElementById('compare-chart');
                   return JSON.parse(JSON.stringify({data: gd.data, layout: gd.layout})); }"""
    )


def notebook_figure(service, runs: dict[str, Any], view: dict[str, Any]) -> dict[str, Any]:
    with batchlab.Client(service.url) as client:
        fig = client.compare_figure(
            runs["ids"],
            key=view["key"],
            x=view["x"],
            baseline=runs["baseline"],
            smoothing=view["smooth"],
            band=view["band"],
        )
    return json.loads(fig.to_json())


def comparable(trace: dict[str, Any], groups: list[str]) -> dict[str, Any]:
    """The shared attributes of a trace, with its group replaced by its rank."""
    if trace["legendgroup"] not in groups:
        groups.append(trace["legendgroup"])
    meta = {**trace.get("meta", {}), "group": groups.index(trace["legendgroup"])}
    return {**{k: trace.get(k) for k in KEYS}, "meta": meta}


def assert_values_close(js: list, py: list, where: str) -> None:
    assert len(js) == len(py), where
    for a, b in zip(js, py, strict=True):
        if a is None or b is None or (isinstance(b, float) and math.isnan(b)):
            assert a is None and (b is None or math.isnan(b)), where
        else:
            assert a == pytest.approx(b, rel=1e-9, abs=1e-12), where


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: f"{v['key']}-{v['x']}-{v['band']}")
def test_dashboard_and_notebook_draw_the_same_traces(page, ui, service, parity_runs, view) -> None:
    js = browser_figure(page, ui, parity_runs, view)
    py = notebook_figure(service, parity_runs, view)
    js_groups: list[str] = []
    py_groups: list[str] = []
    assert len(js["data"]) == len(py["data"]), [t.get("meta") for t in js["data"]]
    for i, (a, b) in enumerate(zip(js["data"], py["data"], strict=True)):
        where = f"trace {i} ({a.get('meta')})"
        assert comparable(a, js_groups) == comparable(b, py_groups), where
        assert_values_close(a["x"], b["x"], f"{where}: x")
        assert_values_close(a["y"], b["y"], f"{where}: y")
    for k in ("legend", "height", "margin", "font", "hovermode"):
        assert js["layout"][k] == py["layout"][k], k
    for ax in ("xaxis", "yaxis", "yaxis2"):
        for k in ("title", "domain", "anchor", "gridcolor", "exponentformat", "rangemode"):
            assert js["layout"].get(ax, {}).get(k) == py["layout"].get(ax, {}).get(k), (ax, k)
    assert js["layout"]["yaxis"]["type"] == py["layout"]["yaxis"]["type"] == "linear"


def test_the_shared_figure_folds_seeds_and_labels_by_what_differs(
    page, ui, service, parity_runs
) -> None:
    """What both sides agree on is the paper's figure (not two equal mistakes)."""
    py = notebook_figure(service, parity_runs, VIEWS[0])
    names = [t["name"] for t in py["data"] if t.get("showlegend")]
    assert names == [
        "kn=256, η=0.1, no warmup: 22.50%±0.50 (2 seeds) · baseline",
        "kn=1k, η=0.4, constant warmup, 2 warmup epochs: 23.00%",
        "kn=8k, η=3.2, gradual warmup, 5 warmup epochs: 25.00%",
    ]
    band = [t for t in py["data"] if t.get("fill") == "tonexty"]
    assert len(band) == 1 and band[0]["meta"]["baseline"] and band[0]["meta"]["band"] == "minmax"
    mean = next(t for t in py["data"] if t["meta"].get("mean"))
    assert sorted(mean["meta"]["runs"]) == sorted(parity_runs["ids"][:2])
    assert mean["line"] == {"color": "#111111", "width": 2}
    # The notebook sees what the browser was served.
    spec = page.evaluate("async () => (await fetch('/static/figure_spec.json')).json()")
    from batchlab.figure import figure_spec

    assert spec == figure_spec()
