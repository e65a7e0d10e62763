"""Run management on the Runs page: tags as chips and a tag filter, search in names, tags
and notes, archive (hidden by default, restorable), bulk actions (tag, archive, delete with
one confirmation, compare, parallel coordinates), the table as CSV, every group in the
group filter, the list of sweeps, and a table that scrolls inside its box at 1024 px."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.browser


def row(page, run_id: int):
    return page.locator(f"tr[data-run-id='{run_id}']")


def shown_ids(page) -> list[int]:
    return page.evaluate(
        "[...document.querySelectorAll('.runs tbody tr')].filter((tr) => !tr.hidden)"
        ".map((tr) => Number(tr.dataset.runId))"
    )


@pytest.fixture()
def managed(service, ui) -> list[int]:
    """Three finished runs named 'mgmt ...', the first tagged and annotated."""
    ids = [
        ui.seed_run(
            service.engine, name=f"mgmt {i}", points=False, spec=ui.full_spec(workers=8 * 2**i)
        )
        for i in range(3)
    ]
    service.http.patch(
        f"/api/runs/{ids[0]}", json={"tags": ["alpha"], "notes": "needle in the notes"}
    ).raise_for_status()
    return ids


def test_tags_search_and_tag_filter(page, managed, ui) -> None:
    first, second, third = managed
    ui.open(page, "#/runs?q=mgmt")
    ui.wait_drawn(page, "runs")
    chip = row(page, first).locator(".chip[data-tag=alpha]")
    assert chip.inner_text() == "alpha"
    assert set(shown_ids(page)) >= {first, second, third}
    # The search box finds notes and tags too, and lives in the URL.
    page.locator("input[name=q]").fill("needle in")
    page.wait_for_function("location.hash.includes('q=needle')")
    page.wait_for_function(
        "(id) => [...document.querySelectorAll('.runs tbody tr')].filter((tr) => !tr.hidden)"
        ".map((tr) => Number(tr.dataset.runId)).join() === String(id)",
        arg=first,
    )
    # A chip filters by its tag (tag= in the URL, the tag menu follows).
    page.locator("input[name=q]").fill("")
    n = ui.drawn_count(page, "runs")
    chip.click()
    page.wait_for_function("location.hash.includes('tag=alpha')")
    ui.wait_drawn(page, "runs", n + 1)
    assert page.locator("select[name=tag]").input_value() == "alpha"
    assert shown_ids(page) == [first]
    # The CSV link carries the same filters.
    csv_href = page.locator("a", has_text="download CSV").get_attribute("href")
    assert csv_href.startswith("/api/runs.csv?") and "tag=alpha" in csv_href
    body = httpx.get(page.url.split("#")[0].rstrip("/") + csv_href).text
    assert "mgmt 0" in body and "mgmt 1" not in body


def test_bulk_tag_archive_restore_and_delete(page, service, managed, ui) -> None:
    first, second, third = managed
    ui.open(page, "#/runs?q=mgmt")
    ui.wait_drawn(page, "runs")
    bulk = page.locator(".bulk")
    assert bulk.is_hidden()
    for run_id in (second, third):
        row(page, run_id).locator("input[type=checkbox]").check()
    assert bulk.is_visible()
    # Tag both at once.
    page.locator("input[name=bulk-tag]").fill("batch-b")
    page.locator(".bulk button[name=tag]").click()
    row(page, second).locator(".chip[data-tag=batch-b]").wait_for()
    row(page, third).locator(".chip[data-tag=batch-b]").wait_for()
    # Archive: hidden by default, shown with archived=only, restorable.
    page.locator(".bulk button[name=archive]").click()
    row(page, second).wait_for(state="detached")
    row(page, third).wait_for(state="detached")
    assert service.http.get(f"/api/runs/{second}").json()["archived"] is True
    page.select_option("select[name=archived]", "only")
    page.wait_for_function("location.hash.includes('archived=only')")
    row(page, second).wait_for()
    assert first not in shown_ids(page)
    row(page, second).locator("input[type=checkbox]").check()
    page.locator(".bulk button[name=unarchive]").click()
    row(page, second).wait_for(state="detached")  # restored: no longer in "archived only"
    assert service.http.get(f"/api/runs/{second}").json()["archived"] is False
    # Delete with one confirmation for the whole selection.
    page.select_option("select[name=archived]", "all")
    row(page, third).wait_for()
    dialogs: list[str] = []

    def accept(d) -> None:
        dialogs.append(d.message)
        d.accept()

    page.on("dialog", accept)
    try:
        for run_id in (second, third):
            row(page, run_id).locator("input[type=checkbox]").check()
        page.locator(".bulk button[name=delete]").click()
        row(page, second).wait_for(state="detached")
        row(page, third).wait_for(state="detached")
    finally:
        page.remove_listener("dialog", accept)
    assert len(dialogs) == 1 and "Delete 2 runs" in dialogs[0]
    assert service.http.get(f"/api/runs/{second}").status_code == 404
    assert service.http.get(f"/api/runs/{third}").status_code == 404
    assert service.http.get(f"/api/runs/{first}").status_code == 200


def test_bulk_compare_and_parallel_open_the_selection(page, managed, ui) -> None:
    first, second, _ = managed
    ui.open(page, "#/runs?q=mgmt")
    ui.wait_drawn(page, "runs")
    for run_id in (second, first):
        row(page, run_id).locator("input[type=checkbox]").check()
    page.locator(".bulk button[name=parallel]").click()
    page.wait_for_function("location.hash.startsWith('#/parallel')")
    assert f"runs={first},{second}" in page.url
    ui.wait_drawn(page, "parallel")


def test_group_filter_lists_every_group_and_sweeps_have_a_list(page, service, ui) -> None:
    from store import db, runs

    with db.session(service.engine) as s:
        cmp_group = runs.create_group(s, name="a comparison group", kind="compare").id
        sweep = runs.create_group(
            s,
            name="a listed sweep",
            kind="sweep",
            spec=ui.full_spec(),
            batch_sizes=[512],
            seeds=[0],
        ).id
    ui.seed_run(
        service.engine, name="in comparison", group_id=cmp_group, points=False, spec=ui.full_spec()
    )
    ui.open(page, "#/runs")
    ui.wait_drawn(page, "runs")
    options = page.locator("select[name=group] option").all_inner_texts()
    assert f"compare {cmp_group}: a comparison group" in options
    assert f"sweep {sweep}: a listed sweep" in options
    # The Sweeps page lists sweeps (and comparison groups), each linked to its page.
    page.locator("header nav a", has_text="Sweeps").click()
    ui.wait_drawn(page, "sweeps")
    link = page.locator(f".sweeps tr[data-group-id='{sweep}'] a", has_text="a listed sweep")
    assert link.get_attribute("href") == f"#/sweep/{sweep}"
    link.click()
    ui.wait_drawn(page, "sweep")
    assert page.locator(".sweep-view h1").inner_text() == "a listed sweep"


def test_table_scrolls_inside_its_box_at_1024px(browser, service, ui) -> None:
    context = ui.new_context(browser, service.url)
    context.set_default_timeout(15_000)
    try:
        pg = context.new_page()
        pg.set_viewport_size({"width": 1024, "height": 768})
        pg.goto("/#/runs?cols=momentum,weight_decay,s.best_val_err")
        ui.wait_drawn(pg, "runs")
        sizes = pg.evaluate(
            """() => {
                const wrap = document.querySelector('.runs-view .table-wrap');
                const doc = document.documentElement;
                return {wrapScroll: wrap.scrollWidth, wrapClient: wrap.clientWidth,
                        docScroll: doc.scrollWidth, docClient: doc.clientWidth};
            }"""
        )
        assert sizes["wrapScroll"] > sizes["wrapClient"], sizes  # the table scrolls...
        assert sizes["docScroll"] <= sizes["docClient"], sizes  # ...the page does not
    finally:
        context.close()
