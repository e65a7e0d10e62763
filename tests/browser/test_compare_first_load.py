"""The compare view's first load (issue 12): Plotly's basic build draws it, not the full
4.8 MB one, and its one /api/metrics read is the trimmed answer (the x column and the
value, 6 digits, the LR panel's corners), which still draws the LR schedule whole."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.browser

# Each Plotly.js <script> the page inserts, with when (Date.now(), as the drawn events).
SCRIPT_RECORDER = """
window.__scripts = [];
new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes) {
    if (n.tagName === 'SCRIPT' && /plotly/.test(n.src || ''))
        window.__scripts.push([n.src.split('/').pop(), Date.now()]);
} }).observe(document, {childList: true, subtree: true});
"""


def test_first_load_uses_the_basic_build_and_a_trimmed_read(browser, service, ui) -> None:
    base = ui.seed_run(service.engine, name="first load base", spec=ui.full_spec(workers=8))
    big = ui.seed_run(service.engine, name="first load 8k", spec=ui.full_spec(workers=256))
    context = ui.new_context(browser, service.url)  # empty caches, no Plotly compiled
    context.add_init_script(SCRIPT_RECORDER)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    reads = []
    page.on("response", lambda r: reads.append(r) if "/api/metrics?" in r.url else None)
    try:
        page.goto(f"/#/compare?runs={base},{big}&baseline={base}")
        ui.wait_drawn(page, "compare")
        # Only the basic build before the draw (app.js compiles the full one in idle time
        # after the first view, for the views that need it).
        drawn_at = page.evaluate("window.__drawn.find((d) => d.view === 'compare').t")
        before = page.evaluate("window.__scripts")
        assert [b[0] for b in before if b[1] < drawn_at] == ["plotly-basic.min.js"], before

        assert len(reads) == 1
        assert all(p in reads[0].url for p in ("columns=epoch%2Cvalue", "digits=6", "drop_flat=lr"))
        answer = json.loads(reads[0].text())["runs"]
        assert set(answer[str(base)]["train_err"]) == {"epoch", "value", "total"}
        lr_points = len(answer[str(base)]["lr"]["value"])
        assert lr_points < answer[str(base)]["lr"]["total"]  # the flat stretches left out

        # The LR panel's line is the schedule at full resolution: every logged point lies
        # on it.
        xs, ys = page.evaluate(
            """(id) => { const t = document.getElementById('compare-chart').data
                 .find((t) => t.yaxis === 'y2' && t.meta.baseline); return [t.x, t.y]; }""",
            base,
        )
        full = httpx.get(
            f"{service.url}/api/runs/{base}/metrics?keys=lr&x=epoch&max_points=100000"
        ).json()["series"]["lr"]
        assert len(xs) == lr_points < len(full["value"])
        assert np.interp(full["epoch"], xs, ys) == pytest.approx(full["value"], rel=1e-5)
        # Once the full build is there too (app.js compiles it after the first view), the
        # chart still knows the build that drew it: plots.js restyles (dark mode) and
        # purges it with that one, as the builds' d3 objects do not mix.
        page.wait_for_function("window.Plotly && window.Plotly.PlotSchema.get().traces.heatmap")
        owner = page.evaluate(
            """() => { const gd = document.getElementById('compare-chart');
                return [gd.__plotly === window.Plotly,
                        Boolean(gd.__plotly.PlotSchema.get().traces.heatmap)]; }"""
        )
        assert owner == [False, False]
        page.emulate_media(color_scheme="dark")
        page.wait_for_function(
            "document.getElementById('compare-chart')._fullLayout.paper_bgcolor === '#161b22'"
        )
        assert not errors, errors
    finally:
        context.close()
