"""The batch-size advisor in the browser (issue 13): the run page's noise-scale plot (the
run's kn across it, above/below from the smoothed value) and layer-health heatmap (one row
per layer in model order, the statistic switch, x linked with the loss curve), their empty
states, the compare page's small multiples, the sweep's predicted critical batch and
measured knee, and the form's new fields. Points are written through the store as the
trainer writes them; Plotly's data is read back from the page."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

pytestmark = pytest.mark.browser

NOISE_STEPS = list(range(9, 640, 10))  # noise_every = 10 over 640 iterations
HEALTH_STEPS = list(range(0, 640, 20))  # health_every = 20
LAYERS = [f"blocks.{i}.conv" for i in range(34)]  # more than the API's 32 keys a request


def noise_value(step: int) -> float:
    """Far above kn = 256 most of the run, far below it over the last 14 measurements."""
    return 50.0 if step >= 500 else 2000.0


def dead(i: int, step: int) -> float:
    return 1.0 if i == 7 and step >= 320 else (i % 4) / 4


def w_norm(i: int, step: int) -> float:
    return 10.0 ** (i % 3) * (1 + step / 1000)


def write(engine: Any, run_id: int, steps: list[int], values_of) -> None:
    from store import metrics

    ipe = 64
    points = [(s, values_of(s), (s + 1) / ipe, 0.01 * (s + 1)) for s in steps]
    metrics.write_points(engine, run_id, points)


@pytest.fixture(scope="module")
def advisor_runs(service, ui) -> dict[str, int]:
    eng = service.engine
    noisy = ui.seed_run(eng, name="noisy", spec=ui.full_spec())
    write(eng, noisy, NOISE_STEPS, lambda s: {"noise_scale": noise_value(s), "noise_g2": 1.0})

    def layer_values(s: int) -> dict[str, float]:
        out = {f"health/{name}/dead": dead(i, s) for i, name in enumerate(LAYERS)}
        out.update({f"health/{name}/w_norm": w_norm(i, s) for i, name in enumerate(LAYERS)})
        out["health/fc/w_norm"] = 3.0  # the classifier: no ReLU after it, so no dead
        return out

    write(eng, noisy, HEALTH_STEPS, layer_values)
    off = ui.seed_run(eng, name="off", spec=ui.full_spec(noise_every=0, health_every=0))
    return {"noisy": noisy, "off": off}


def trace(page, chart: str, role: str | None = None, index: int = 0) -> dict[str, Any]:
    js = """([id, role, i]) => {
        const el = document.getElementById(id);
        const t = role ? el.data.find((d) => d.meta && d.meta.role === role) : el.data[i];
        if (!t) return null;
        return JSON.parse(JSON.stringify({...t, x: Array.from(t.x), y: Array.from(t.y)}));
    }"""
    return page.evaluate(js, [chart, role, index])


def test_noise_plot(page, advisor_runs, ui) -> None:
    run_id = advisor_runs["noisy"]
    ui.open(page, f"#/run/{run_id}")
    ui.wait_drawn(page, "run")
    assert page.locator("[data-panel=noise] h3").text_content() == "Gradient noise scale"
    curve = trace(page, "chart-noise")
    assert curve["x"] == NOISE_STEPS
    assert curve["y"] == [noise_value(s) for s in NOISE_STEPS]
    kn = trace(page, "chart-noise", "kn")
    assert kn["name"] == "this run's kn = 256"
    assert kn["y"] == [256, 256] and kn["x"] == [NOISE_STEPS[0], NOISE_STEPS[-1]]
    assert page.evaluate("document.getElementById('chart-noise').layout.yaxis.type") == "log"
    # Unsmoothed, the last value (50) is below kn: kn is above the noise scale.
    verdict = page.locator(".noise-verdict")
    assert verdict.inner_text().startswith("kn = 256 is above the noise scale (B_simple ≈ 50)")
    assert not page.locator(".noise-empty").is_visible()

    # Smoothed (debiased EMA 0.99) the latest value is still ~1.4k: kn is below it.
    ui.open(page, f"#/run/{run_id}?smooth=0.99")
    ui.wait_drawn(page, "run")
    assert "kn = 256 is below the noise scale" in verdict.inner_text()
    assert "smoothed" in verdict.inner_text()

    # The page's x axis applies: epochs, and samples for the kn line too.
    ui.open(page, f"#/run/{run_id}?x=epoch")
    ui.wait_drawn(page, "run")
    assert trace(page, "chart-noise")["x"] == pytest.approx([(s + 1) / 64 for s in NOISE_STEPS])
    ui.open(page, f"#/run/{run_id}?x=samples")
    ui.wait_drawn(page, "run")
    assert trace(page, "chart-noise", "kn")["x"] == [256 * 10, 256 * 640]


def test_health_heatmap_rows_switch_and_link(page, advisor_runs, ui) -> None:
    run_id = advisor_runs["noisy"]
    ui.open(page, f"#/run/{run_id}")
    ui.wait_drawn(page, "run")
    info = ui.wait_drawn(page, "health")
    assert info["rows"] == 34 and info["stat"] == "dead"
    heat = page.evaluate(
        """() => { const t = document.getElementById('chart-health').data[0];
            return {x: Array.from(t.x), y: Array.from(t.y), z: t.z.map((r) => Array.from(r)),
                    type: t.type, zmin: t.zmin, zmax: t.zmax}; }"""
    )
    assert heat["type"] == "heatmap"
    # One row per layer, in model order (blocks.2 before blocks.10), two batched reads.
    assert heat["y"] == LAYERS
    assert heat["x"] == HEALTH_STEPS
    assert heat["z"] == [[dead(i, s) for s in HEALTH_STEPS] for i in range(34)]
    assert (heat["zmin"], heat["zmax"]) == (0, 1)
    # The first layer on top: the category axis runs from the last row (bottom) up.
    y_range = page.evaluate("document.getElementById('chart-health')._fullLayout.yaxis.range")
    assert y_range[0] > y_range[1]

    # The switch: weight norms, every layer (fc too, last), on a log colour scale.
    page.select_option("select[name=health_stat]", "w_norm")
    page.wait_for_function("window.__drawn.some((d) => d.view === 'health' && d.stat === 'w_norm')")
    assert "health=w_norm" in page.url
    w = page.evaluate(
        """() => { const t = document.getElementById('chart-health').data[0];
            return {y: Array.from(t.y), z: t.z.map((r) => Array.from(r)),
                    raw: t.customdata.map((r) => Array.from(r))}; }"""
    )
    assert w["y"] == [*LAYERS, "fc"]
    assert w["raw"][1] == pytest.approx([w_norm(1, s) for s in HEALTH_STEPS])
    assert w["raw"][-1] == pytest.approx([3.0] * len(HEALTH_STEPS))
    assert w["z"][2] == pytest.approx([math.log10(w_norm(2, s)) for s in HEALTH_STEPS])

    # Zooming the loss curve zooms the heatmap, and the other way round.
    page.evaluate(
        "Plotly.relayout(document.getElementById('chart-loss'), {'xaxis.range': [100, 300]})"
    )
    page.wait_for_function(
        "JSON.stringify(document.getElementById('chart-health').layout.xaxis.range) === '[100,300]'"
    )
    page.evaluate(
        "Plotly.relayout(document.getElementById('chart-health'), {'xaxis.range': [200, 400]})"
    )
    page.wait_for_function(
        "JSON.stringify(document.getElementById('chart-loss').layout.xaxis.range) === '[200,400]'"
    )


def test_empty_states(page, advisor_runs, ui) -> None:
    ui.open(page, f"#/run/{advisor_runs['off']}")
    ui.wait_drawn(page, "run")
    ui.wait_drawn(page, "health")
    empty = page.locator(".noise-empty")
    assert empty.is_visible()
    assert "noise_every = 0" in empty.inner_text()
    assert not page.locator("#chart-noise").is_visible()
    assert not page.locator(".noise-verdict").is_visible()
    assert "health_every = 0" in page.locator(".health-empty").inner_text()
    assert not page.locator("#chart-health").is_visible()
    # The other curves are there as usual.
    assert page.locator("#chart-loss").is_visible()


@pytest.fixture(scope="module")
def warmups(service, ui) -> dict[str, int]:
    """kn = 1k, constant against gradual warmup: the constant one's conv2 dies early."""
    eng = service.engine
    ids = {}
    for warmup in ("constant", "gradual"):
        run_id = ui.seed_run(eng, name=f"{warmup}", spec=ui.full_spec(workers=32, warmup=warmup))
        gone = 0.8 if warmup == "constant" else 0.0

        def values(s: int, gone: float = gone, scale: float = 2.0 if gone else 1.0):
            return {
                "health/conv1/dead": 0.0,
                "health/conv2/dead": gone if s >= 20 else 0.0,
                "health/conv1/w_norm": scale * (1 + s),
                "health/conv2/w_norm": 10.0,
                "health/fc/w_norm": 5.0,
            }

        write(eng, run_id, list(range(0, 160, 10)), values)
        ids[warmup] = run_id
    ids["plain"] = ui.seed_run(eng, name="plain", spec=ui.full_spec(workers=16))
    return ids


def test_compare_heatmaps(page, warmups, ui) -> None:
    a, b = warmups["constant"], warmups["gradual"]
    ui.open(page, f"#/compare?runs={a},{b}&x=step")
    ui.wait_drawn(page, "compare")
    info = ui.wait_drawn(page, "compare-health")
    assert info["runs"] == 2
    multiples = page.locator(".compare-health .health-multiple")
    assert multiples.count() == 2
    read = """() => [...document.querySelectorAll('.compare-health .health-multiple .chart')].map(
        (el) => ({run: Number(el.dataset.runId), title: el.layout.title.text,
                  y: Array.from(el.data[0].y), z: el.data[0].z.map((r) => Array.from(r)),
                  zmin: el.data[0].zmin, zmax: el.data[0].zmax, scale: el.data[0].showscale}))"""
    charts = page.evaluate(read)
    by_run = {c["run"]: c for c in charts}
    # Titled with the compare legend's labels: the constant run's conv2 died.
    legend = page.evaluate(
        "document.getElementById('compare-chart').data.filter((t) => t.showlegend !== false"
        " && t.meta && !t.meta.lr && !t.meta.raw && !t.meta.band).map((t) => t.name)"
    )
    assert sorted(c["title"] for c in charts) == sorted(legend)
    assert "constant warmup" in by_run[a]["title"] and "gradual warmup" in by_run[b]["title"]
    assert by_run[a]["y"] == ["conv1", "conv2"]
    assert by_run[a]["z"][1] == [0.0] * 2 + [0.8] * 14
    assert by_run[b]["z"][1] == [0.0] * 16
    # The weight norms: one log colour scale shared by both, the colour bar drawn once.
    page.select_option(".compare-health select[name=health_stat]", "w_norm")
    page.wait_for_function(
        "window.__drawn.some((d) => d.view === 'compare-health' && d.stat === 'w_norm')"
    )
    charts = page.evaluate(read)
    assert [c["y"] for c in charts] == [["conv1", "conv2", "fc"]] * 2
    lo, hi = math.log10(1.0), math.log10(2.0 * 151)
    for c in charts:
        assert (c["zmin"], c["zmax"]) == (pytest.approx(lo), pytest.approx(hi))
    assert sorted(c["scale"] for c in charts) == [False, True]

    # Runs without health keys: no section.
    ui.open(page, f"#/compare?runs={warmups['plain']}")
    ui.wait_drawn(page, "compare")
    ui.wait_drawn(page, "compare-health")
    assert not page.locator(".compare-health").is_visible()


def base_noise(step: int) -> dict[str, float]:
    return {"noise_scale": 5000.0 if step < 300 else 500.0 + step / 2}


@pytest.fixture(scope="module")
def advised_sweep(service, ui) -> dict[str, Any]:
    """A sweep whose baselines measured the noise scale (~700) and whose error rises at
    kn = 4k: the server computes its advice (GET /api/sweeps/ID)."""
    from store import db, runs

    eng = service.engine
    with db.session(eng) as s:
        group = runs.create_group(
            s,
            name="advised",
            kind="sweep",
            spec=ui.full_spec(),
            batch_sizes=[1024, 4096, 8192],
            seeds=[0, 1],
        ).id
    base = []
    for sd in (0, 1):
        rid = ui.seed_run(
            eng,
            name=f"base {sd}",
            group_id=group,
            is_baseline=True,
            points=False,
            spec=ui.full_spec(workers=8, warmup="none", seed=sd),
            summary={"final_val_err": 0.20 + 0.002 * sd},
        )
        # 650, 700, 750, 800 over the last half (the first half's 5000 is left out).
        write(eng, rid, list(range(0, 700, 100)), base_noise)
        base.append(rid)
    for kn, err in ((1024, 0.201), (4096, 0.26), (8192, 0.5)):
        for sd in (0, 1):
            ui.seed_run(
                eng,
                name=f"kn {kn} {sd}",
                group_id=group,
                baseline_id=base[0],
                points=False,
                spec=ui.full_spec(workers=kn // 32, seed=sd),
                summary={"final_val_err": err},
            )
    return {"group": group, "base": base}


def sweep_traces(page) -> dict[str, dict[str, Any]]:
    got = page.evaluate(
        """() => document.getElementById('sweep-chart').data.map((t) => ({role: t.meta.role,
            name: t.name, x: Array.from(t.x), y: Array.from(t.y), yaxis: t.yaxis || 'y'}))"""
    )
    return {t["role"]: t for t in got}


def test_sweep_band_and_knee(page, advised_sweep, service, ui) -> None:
    group = advised_sweep["group"]
    advice = service.http.get(f"/api/sweeps/{group}").json()["advice"]
    cb, knee = advice["critical_batch"], advice["knee"]
    assert knee["batch_size"] == 4096
    ui.open(page, f"#/sweep/{group}")
    ui.wait_drawn(page, "sweep")
    t = sweep_traces(page)
    band = t["critical-band"]
    assert band["name"] == "predicted critical batch (noise scale)"
    assert band["yaxis"] == "y2"
    assert band["x"] == pytest.approx([cb["q25"], cb["q75"], cb["q75"], cb["q25"], cb["q25"]])
    assert t["critical-median"]["x"] == pytest.approx([cb["median"]] * 2)
    assert t["knee"]["x"] == [4096, 4096]
    assert t["knee"]["name"] == "measured knee: kn = 4k"
    layout = page.evaluate("document.getElementById('sweep-chart').layout")
    assert layout["yaxis2"]["overlaying"] == "y" and layout["yaxis2"]["range"] == [0, 1]
    # The band is inside the x range.
    lo, hi = layout["xaxis"]["range"]
    assert lo <= math.log10(cb["q25"]) and math.log10(cb["q75"]) <= hi
    note = page.locator(".advice-note").inner_text()
    assert "Measured knee: kn = 4k" in note and "Predicted critical batch" in note
    assert not page.locator(".auto-state").is_visible()


def test_sweep_partial_advice_and_auto_state(page, advised_sweep, ui) -> None:
    """Advice the server may send while a sweep is young, injected into its answer."""
    group = advised_sweep["group"]
    variants = [
        (
            {
                "critical_batch": None,
                "knee": {
                    "batch_size": None,
                    "baseline_mean": 0.2,
                    "baseline_std": 0.001,
                    "threshold": 0.21,
                    "metric": "val_err",
                    "rule": "r",
                },
            },
            ["No predicted critical batch", "No knee: no finished batch size"],
        ),
        (None, ["No predicted critical batch", "No measured knee yet"]),
    ]

    def answering(advice: dict[str, Any] | None):
        def answer(route) -> None:
            body = route.fetch().json()
            body["advice"] = advice
            body["sweep"]["auto_state"] = "waiting"
            body["sweep"]["auto_message"] = None
            route.fulfill(status=200, content_type="application/json", body=json.dumps(body))

        return answer

    for advice, says in variants:
        page.route(f"**/api/sweeps/{group}", answering(advice))
        try:
            ui.open(page, f"#/sweep/{group}")
            ui.wait_drawn(page, "sweep")
            roles = set(sweep_traces(page))
            assert not roles & {"critical-band", "critical-median", "knee"}
            note = page.locator(".advice-note").inner_text()
            for text in says:
                assert text in note
            auto = page.locator(".auto-state")
            assert auto.inner_text() == "Auto sweep: waiting for the baseline’s noise scale."
        finally:
            page.unroute(f"**/api/sweeps/{group}")


def test_form_fields_reach_post(page, advisor_runs, advised_sweep, ui) -> None:
    from trainer.spec import RunSpec

    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    form = "form.newrun"
    defaults = RunSpec()
    assert page.locator(f"{form} [name=noise_every]").input_value() == str(defaults.noise_every)
    assert page.locator(f"{form} [name=health_every]").input_value() == str(defaults.health_every)
    assert page.locator(f"{form} [name=backward_splits]").input_value() == "1"
    assert page.locator(f"{form} [name=optimizer] option").all_inner_texts() == [
        "sgd",
        "lars",
        "lamb",
    ]
    # A bad value: the server's 422 lands on the field.
    page.locator(f"{form} [name=noise_every]").fill("-1")
    page.wait_for_function(
        "document.querySelector('.field[data-field=noise_every] .err').textContent !== ''"
    )
    assert (
        "greater than or equal to 0"
        in page.locator(".field[data-field=noise_every] .err").inner_text()
    )

    small = {
        "model": "mlp",
        "dataset": "synthetic",
        "dataset_size": "400",
        "epochs": "2",
        "warmup_epochs": "1",
        "noise_every": "5",
        "health_every": "7",
        "workers": "4",
        "backward_splits": "2",
    }
    for name, value in {**small, "optimizer": "lars"}.items():
        el = page.locator(f"{form} [name={name}]")
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(value)
        else:
            el.fill(value)
    page.wait_for_function(
        "document.querySelector('.field[data-field=noise_every] .err').textContent === ''"
    )
    sent: list[dict[str, Any]] = []

    def capture(route, target: dict[str, Any]) -> None:
        if route.request.method != "POST":
            route.continue_()
            return
        sent.append(json.loads(route.request.post_data))
        route.fulfill(status=201, content_type="application/json", body=json.dumps(target))

    page.route("**/api/runs", lambda r: capture(r, {"run": {"id": advisor_runs["noisy"]}}))
    try:
        page.locator(f"{form} button[type=submit]").click()
        page.wait_for_function(f"location.hash.startsWith('#/run/{advisor_runs['noisy']}')")
    finally:
        page.unroute("**/api/runs")
    spec = sent[0]["spec"]
    assert (spec["noise_every"], spec["health_every"], spec["backward_splits"]) == (5, 7, 2)
    assert spec["optimizer"] == "lars"

    # A sweep of batch sizes "auto": the box writes the literal, the server plans it.
    small_sweep = "model=mlp&dataset=synthetic&dataset_size=4000&epochs=2&warmup_epochs=1"
    ui.open(page, f"#/new?mode=sweep&{small_sweep}&decay=cosine")
    ui.wait_drawn(page, "new")
    page.locator(f"{form} [name=auto_sizes]").check()
    assert page.locator(f"{form} [name=batch_sizes]").input_value() == "auto"
    page.wait_for_function("location.hash.includes('batch_sizes=auto')")
    page.route("**/api/sweeps", lambda r: capture(r, {"sweep": {"id": advised_sweep["group"]}}))
    try:
        page.locator(f"{form} button[type=submit]").click()
        page.wait_for_function(f"location.hash.startsWith('#/sweep/{advised_sweep['group']}')")
    finally:
        page.unroute("**/api/sweeps")
    assert sent[1]["batch_sizes"] == "auto"
    assert sent[1]["baseline"] is True


def test_live_run_grows_noise_and_heatmap(page, service, ui) -> None:
    """A running run: new noise points reach the plot over SSE, new health points make the
    heatmap re-read (one more column)."""
    from store import db, runs

    eng = service.engine
    run_id = ui.seed_run(eng, name="live advisor", spec=ui.full_spec(), status="running")
    write(eng, run_id, [9, 19], lambda s: {"noise_scale": 1000.0})
    write(eng, run_id, [0, 20], lambda s: {"health/conv1/dead": 0.0, "health/fc/w_norm": 1.0})
    ui.open(page, f"#/run/{run_id}")
    ui.wait_drawn(page, "run")
    first = ui.wait_drawn(page, "health")
    assert (first["rows"], first["cols"]) == (1, 2)
    assert "is below the noise scale" in page.locator(".noise-verdict").inner_text()
    page.wait_for_timeout(500)  # the stream is open
    # After the seeded curves' last step (639), as a training run logs them.
    write(eng, run_id, [649], lambda s: {"noise_scale": 10.0})
    write(eng, run_id, [660], lambda s: {"health/conv1/dead": 0.5, "health/fc/w_norm": 1.0})
    page.wait_for_function(
        "document.getElementById('chart-noise').data[0].y.length === 3", timeout=10_000
    )
    assert "is above the noise scale" in page.locator(".noise-verdict").inner_text()
    page.wait_for_function(
        "window.__drawn.some((d) => d.view === 'health' && d.cols === 3)", timeout=10_000
    )
    z = page.evaluate("Array.from(document.getElementById('chart-health').data[0].z[0])")
    assert z == [0.0, 0.0, 0.5]
    with db.session(eng) as s:
        runs.mark_finished(s, run_id, "succeeded")
