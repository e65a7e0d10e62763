"""Dark mode follows the system setting: a dark page, and Plotly figures whose paper,
grid and text follow (the light spec of figure_spec.json stays the notebook's)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

BODY_BG = "getComputedStyle(document.body).backgroundColor"


def luminance(css: str) -> float:
    """0..255 mean of an rgb()/rgba() colour."""
    parts = css[css.index("(") + 1 : css.index(")")].split(",")
    return sum(float(p) for p in parts[:3]) / 3


@pytest.fixture(scope="module")
def dark_run(service, ui) -> int:
    return ui.seed_run(
        service.engine, name="dark base", is_baseline=True, spec=ui.full_spec(warmup="none")
    )


def open_in(browser, service, ui, scheme: str, route: str):
    context = browser.new_context(
        base_url=service.url, viewport={"width": 1280, "height": 800}, color_scheme=scheme
    )
    context.add_init_script(
        "window.__drawn = []; document.addEventListener('batchlab:drawn', "
        "(e) => window.__drawn.push(e.detail));"
    )
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    pg.goto("/" + route)
    ui.wait_drawn(pg, "compare", timeout_ms=20_000)
    return context, pg


def test_dark_page_and_plot(browser, service, dark_run, ui) -> None:
    context, pg = open_in(
        browser, service, ui, "dark", f"#/compare?runs={dark_run}&baseline={dark_run}"
    )
    try:
        assert luminance(pg.evaluate(BODY_BG)) < 60
        layout = pg.evaluate("document.getElementById('compare-chart').layout")
        assert (
            luminance(
                f"rgb({int(layout['paper_bgcolor'][1:3], 16)},"
                f"{int(layout['paper_bgcolor'][3:5], 16)},"
                f"{int(layout['paper_bgcolor'][5:7], 16)})"
            )
            < 60
        )
        assert layout["plot_bgcolor"] == layout["paper_bgcolor"]
        assert layout["xaxis"]["gridcolor"] != "#eceef1"
        # The baseline stays visible on dark paper (light, not black).
        colors = pg.evaluate(
            "document.getElementById('compare-chart').data"
            ".filter((t) => t.meta && t.meta.baseline && !t.meta.raw).map((t) => t.line.color)"
        )
        assert colors and "#111111" not in colors
    finally:
        context.close()


def test_light_stays_the_figure_spec(browser, service, dark_run, ui) -> None:
    context, pg = open_in(
        browser, service, ui, "light", f"#/compare?runs={dark_run}&baseline={dark_run}"
    )
    try:
        assert luminance(pg.evaluate(BODY_BG)) > 200
        layout = pg.evaluate("document.getElementById('compare-chart').layout")
        assert layout["paper_bgcolor"] == "#fff"
        assert layout["xaxis"]["gridcolor"] == "#eceef1"
    finally:
        context.close()
