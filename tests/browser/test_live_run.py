"""End to end: a run submitted from the form is trained by the real worker, shows up in
the runs table, and its curves grow live on the run page (SSE + Plotly.extendTraces)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# 6400 synthetic samples (5120 train), k*n = 2*16: 160 iterations per epoch, 8 epochs:
# long enough (a few seconds) for several live draws even on an idle machine.
FORM = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": "6400",
    "epochs": "8",
    "workers": "2",
    "batch_per_worker": "16",
    "ref_batch": "32",
    "warmup_epochs": "1",
    "milestones": "3",
    "name": "live from the form",
}


def trace_len(page, panel: str, trace: int = 0) -> int:
    return page.evaluate(
        "([p, i]) => document.getElementById('chart-' + p).data[i].x.length", [panel, trace]
    )


def test_form_run_trains_and_streams_live(page, service, ui) -> None:
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    for name, value in FORM.items():
        el = page.locator(f"form.newrun [name={name}]")
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(value)
        else:
            el.fill(value)
    page.locator("form.newrun [name=checkpoint]").uncheck()
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url("**/#/run/*")
    run_id = int(page.url.rsplit("/", 1)[1])

    # The history is drawn first (usually empty: the run is queued or just started) ...
    first = ui.wait_drawn(page, "run")
    start_points = trace_len(page, "loss")
    # ... then points arrive over SSE and are appended: several separate live draws, the
    # last step growing each time, the loss trace getting longer.
    page.wait_for_function(
        "(n) => document.getElementById('chart-loss').data[0].x.length > n + 10",
        arg=start_points,
        timeout=60_000,
    )
    # Several separate draws, not one: wait for them rather than sample the first moment.
    page.wait_for_function(
        "() => window.__drawn.filter(d => d.view === 'run').length >= 3", timeout=60_000
    )
    live = page.evaluate("window.__drawn.filter(d => d.view === 'run')")
    steps = [d["lastStep"]["loss"] for d in live]
    assert len(live) >= 3 and steps == sorted(steps) and steps[-1] > first["lastStep"]["loss"]
    # The run ends: the status event turns the badge, every point is on the plots.
    page.wait_for_selector(".run-view .badge.s-succeeded", timeout=60_000)
    total = service.http.get(f"/api/runs/{run_id}").json()["derived"]["total_iters"]
    assert total == 1280  # 5120 training samples / 32 per iteration x 8 epochs
    page.wait_for_function(
        "(n) => document.getElementById('chart-loss').data[0].x.length >= n", arg=total
    )
    xs = page.evaluate("document.getElementById('chart-loss').data[0].x")
    assert xs == list(range(total))  # each iteration once, in order: nothing lost or doubled
    val = page.evaluate("document.getElementById('chart-err').data[1].y")
    assert len(val) == 8 and all(0 <= v <= 100 for v in val)  # val error per epoch, in %
    assert "ETA" not in page.locator(".run-view .bar-text").inner_text()

    # The runs table lists it, with its figures, without a reload.
    ui.open(page, "#/runs")
    row = page.locator(f"tr[data-run-id='{run_id}']")
    row.wait_for()
    assert row.locator("td.name").inner_text().startswith("live from the form")
    assert row.locator(".badge").inner_text() == "succeeded"
    cells = row.locator("td").all_inner_texts()
    assert cells[5:8] == ["2", "16", "32"]  # k, n, k*n
    assert cells[11].endswith("%")  # final validation error
