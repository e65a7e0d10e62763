"""A link reproduces the view: each page's controls are worked, every URL the page itself
writes (location.hash after each action) is collected, and each is opened in a fresh tab,
which must show the same view (same traces or rows, same control states)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.browser

# The state of a page's controls: every named select and input in the view.
CONTROLS_JS = """(sel) => Object.fromEntries([...document.querySelectorAll(sel)]
    .filter((el) => el.name && !el.name.startsWith('col-') && el.name !== 'bulk-tag')
    .map((el) => [el.name, el.type === 'checkbox' ? el.checked : el.value]))"""

COMPARE_JS = """() => {
    const el = document.getElementById('compare-chart');
    const r = (v) => (typeof v === 'number' ? Number(v.toPrecision(8)) : v);
    return {
        traces: (el.data || []).map((t) => [t.name || '', t.yaxis || 'y', t.x.length,
            r(t.x[0]), r(t.x[t.x.length - 1]), r(t.y[t.y.length - 1]), JSON.stringify(t.meta)]),
        xrange: el.layout.xaxis.autorange ? null : el.layout.xaxis.range.map(r),
        ytype: el.layout.yaxis.type,
        xtitle: el.layout.xaxis.title.text,
    };
}"""


def fresh_view(browser_context: Any, url: str, wait: Callable[[Any], None]) -> Any:
    """A new tab opened straight on ``url`` (a link pasted), once its view is drawn."""
    pg = browser_context.new_page()
    pg.set_default_timeout(15_000)
    pg.goto("/" + url)
    wait(pg)
    return pg


def drawn(page: Any, view: str) -> int:
    return page.evaluate("(v) => window.__drawn.filter((d) => d.view === v).length", view)


def after(page: Any, view: str, action: Callable[[], None], timeout_ms: int = 15_000) -> None:
    """Do ``action`` and wait for the view's next draw."""
    n = drawn(page, view)
    action()
    page.wait_for_function(
        "([v, n]) => window.__drawn.filter((d) => d.view === v).length > n",
        arg=[view, n],
        timeout=timeout_ms,
    )


@pytest.fixture(scope="module")
def link_runs(service, ui) -> list[int]:
    spec = ui.full_spec
    return [
        ui.seed_run(
            service.engine,
            name="link base",
            is_baseline=True,
            spec=spec(workers=8, warmup="none"),
            final_err=0.2,
        ),
        ui.seed_run(service.engine, name="link 1k", spec=spec(workers=32), final_err=0.21),
        ui.seed_run(service.engine, name="link 8k", spec=spec(workers=256), final_err=0.23),
    ]


def test_compare_link_with_a_range_draws_curves(browser_context, link_runs, ui) -> None:
    """Issue 12 item 1: this link once drew bare axes and read no metrics."""
    a, b, c = link_runs
    url = f"#/compare?runs={a},{b},{c}&baseline={a}&x=epoch&key=train_err&logy=0&smooth=0.6&xr=0,4"
    requests: list[str] = []
    pg = browser_context.new_page()
    pg.on("request", lambda r: requests.append(r.url))
    try:
        pg.goto("/" + url)
        ui.wait_drawn(pg, "compare")
        view = pg.evaluate(COMPARE_JS)
    finally:
        pg.close()
    assert any("/metrics" in u for u in requests), requests
    curves = [t for t in view["traces"] if t[1] == "y" and t[2] > 0]
    lr = [t for t in view["traces"] if t[1] == "y2" and t[2] > 0]
    assert len(curves) >= 3 and len(lr) == 3
    assert view["xrange"] == [0, 4]


def test_every_compare_url_reproduces_its_view(page, browser_context, link_runs, ui) -> None:
    a, b, c = link_runs
    ui.open(page, f"#/compare?runs={a},{b},{c}&baseline={a}")
    ui.wait_drawn(page, "compare")
    controls = ".compare-view .toolbar select, .compare-view .toolbar input"
    actions: list[Callable[[], None]] = [
        lambda: page.select_option("select[name=x]", "step"),
        lambda: page.select_option("select[name=key]", "loss"),
        lambda: page.locator("input[name=logy]").check(),
        lambda: page.locator("input[name=smooth]").fill("0.3"),
        lambda: page.select_option("select[name=baseline]", str(b)),
        lambda: page.evaluate(
            "((el) => (el.__plotly || Plotly).relayout(el, "
            "{'xaxis.range[0]': 3, 'xaxis.range[1]': 12}))"
            "(document.getElementById('compare-chart'))"
        ),
        lambda: page.select_option("select[name=x]", "epoch"),
        lambda: page.select_option("select[name=band]", "off"),
    ]
    seen: list[tuple[str, dict, dict]] = []
    for act in actions:
        after(page, "compare", act)
        page.wait_for_timeout(300)  # a zoom's re-read settles after its debounce
        url = page.evaluate("location.hash")
        seen.append((url, page.evaluate(COMPARE_JS), page.evaluate(CONTROLS_JS, controls)))
    assert any("xr=3,12" in u for u, _, _ in seen)
    assert len({u for u, _, _ in seen}) == len(seen)  # every action changed the URL
    for url, view, state in seen:
        pg = fresh_view(browser_context, url, lambda p: ui.wait_drawn(p, "compare"))
        try:
            assert pg.evaluate(COMPARE_JS) == view, url
            assert pg.evaluate(CONTROLS_JS, controls) == state, url
        finally:
            pg.close()


RUNS_JS = """() => ({
    rows: [...document.querySelectorAll('.runs tbody tr')].filter((tr) => !tr.hidden)
        .map((tr) => [...tr.querySelectorAll('td')].slice(1).map((td) => td.innerText)),
    head: [...document.querySelectorAll('.runs thead th')].map((th) =>
        `${th.textContent}|${th.getAttribute('aria-sort') || ''}`),
})"""


def test_every_runs_url_reproduces_its_view(page, browser_context, link_runs, ui) -> None:
    ui.open(page, "#/runs")
    wait_runs = lambda p: ui.wait_drawn(p, "runs")  # noqa: E731
    wait_runs(page)
    controls = ".runs-view .toolbar select, .runs-view .toolbar input"
    actions: list[Callable[[], None]] = [
        lambda: page.locator("input[name=q]").fill("link"),
        lambda: page.locator("th[data-col=kn]").click(),
        lambda: page.locator("th[data-col=kn]").click(),
        lambda: page.select_option("select[name=status]", "succeeded"),
        lambda: (
            page.locator(".columns-menu summary").click(),
            page.locator("input[name='col-momentum']").check(),
            page.locator("input[name='col-s.best_val_err']").check(),
            page.locator(".columns-menu summary").click(),  # closes the menu
        ),
        lambda: page.locator("th[data-col='s.best_val_err']").click(),
        lambda: page.select_option("select[name=archived]", "all"),
    ]
    seen: list[tuple[str, dict, dict]] = []
    for act in actions:
        after(page, "runs", act)
        url = page.evaluate("location.hash")
        seen.append((url, page.evaluate(RUNS_JS), page.evaluate(CONTROLS_JS, controls)))
    assert len({u for u, _, _ in seen}) == len(seen)

    # The sorted view: 8k, 1k, 256 (k·n descending), then by best error ascending.
    def names(view: dict) -> list[str]:
        return [r[1].removesuffix(" baseline") for r in view["rows"]]

    assert names(seen[2][1]) == ["link 8k", "link 1k", "link base"]
    assert names(seen[5][1])[:3] == ["link base", "link 1k", "link 8k"]
    for url, view, state in seen:
        pg = fresh_view(browser_context, url, wait_runs)
        try:
            assert pg.evaluate(RUNS_JS) == view, url
            assert pg.evaluate(CONTROLS_JS, controls) == state, url
        finally:
            pg.close()


SWEEP_JS = """() => ({
    traces: document.getElementById('sweep-chart').data.map((t) =>
        [t.meta.role, Array.from(t.x), Array.from(t.y)]),
    rows: [...document.querySelectorAll('.sweep-table tbody tr')].map((tr) => tr.innerText),
    ytitle: document.getElementById('sweep-chart').layout.yaxis.title.text,
})"""


def test_every_sweep_url_reproduces_its_view(page, browser_context, service, ui) -> None:
    from store import db, runs

    with db.session(service.engine) as s:
        group = runs.create_group(
            s, name="link sweep", kind="sweep", spec=ui.full_spec(), batch_sizes=[1024], seeds=[0]
        ).id
    for kn, err in ((256, 0.2), (1024, 0.22)):
        ui.seed_run(
            service.engine,
            name=f"link sweep {kn}",
            group_id=group,
            is_baseline=kn == 256,
            points=False,
            spec=ui.full_spec(workers=kn // 32),
            summary={"final_val_err": err, "best_val_err": err - 0.05},
        )
    ui.open(page, f"#/sweep/{group}")
    ui.wait_drawn(page, "sweep")
    controls = ".sweep-view .toolbar select"
    seen = []
    for choice in ("best", "median5", "final"):
        after(page, "sweep", lambda c=choice: page.select_option("select[name=err]", c))
        seen.append(
            (
                page.evaluate("location.hash"),
                page.evaluate(SWEEP_JS),
                page.evaluate(CONTROLS_JS, controls),
            )
        )
    assert "err=best" in seen[0][0] and seen[0][1]["ytitle"].startswith("best")
    for url, view, state in seen:
        pg = fresh_view(browser_context, url, lambda p: ui.wait_drawn(p, "sweep"))
        try:
            assert pg.evaluate(SWEEP_JS) == view, url
            assert pg.evaluate(CONTROLS_JS, controls) == state, url
        finally:
            pg.close()


def test_compare_without_runs_says_how_to_pick_them(page, ui) -> None:
    ui.open(page, "#/compare")
    ui.wait_drawn(page, "compare")
    message = page.locator(".compare-view .empty")
    assert message.is_visible()
    assert "No runs to compare yet" in message.inner_text()
    assert message.locator("a[href='#/runs']").count() == 1
    assert "loading" not in page.locator(".compare-view .toolbar").inner_text()
    assert page.locator("#compare-chart").is_hidden()


def test_compare_link_with_unknown_ids_says_so(page, link_runs, ui) -> None:
    a, b, _ = link_runs
    ui.open(page, f"#/compare?runs={a},{b},999999&xr=1,5")
    ui.wait_drawn(page, "compare")
    notice = page.locator(".compare-view .notice")
    assert notice.is_visible() and "999999 does not exist" in notice.inner_text()
    view = page.evaluate(COMPARE_JS)
    assert len([t for t in view["traces"] if t[1] == "y" and t[2] > 0]) >= 2
    # Downloads of the comparison: the runs that exist, at full resolution.
    assert page.locator(".exports a", has_text="CSV").get_attribute("href") == (
        f"/api/metrics.csv?runs={a},{b}"
    )
    assert page.locator(".exports a", has_text="Parquet").get_attribute("href") == (
        f"/api/metrics.parquet?runs={a},{b}"
    )
