"""The runs table: live status and progress without a reload, filters in the URL, and
picking runs for Compare (the baseline chosen from the selection)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


def test_table_updates_live_and_filters(page, service, ui) -> None:
    from store import db, runs

    run_id = ui.seed_run(
        service.engine,
        name="watch me",
        spec=ui.full_spec(epochs=4, milestones=[2, 3]),
        status="queued",
    )
    ui.open(page, "#/runs")
    row = page.locator(f"tr[data-run-id='{run_id}']")
    row.wait_for()
    assert row.locator(".badge").inner_text() == "queued"
    # A worker takes it and reports progress: the row follows within a poll (2 s).
    with db.session(service.engine) as s:
        runs.mark_running(s, run_id, host="gpubox", gpus="0,1", worker="gpu0@gpubox")
        runs.set_progress(s, run_id, 0.5, 30.0)
    page.wait_for_function(
        "(id) => document.querySelector(`tr[data-run-id='${id}'] .badge`)"
        ".textContent === 'running'",
        arg=run_id,
        timeout=10_000,
    )
    assert row.locator(".bar-text").inner_text() == "50% · ETA 30 s"
    assert row.locator("td").nth(13).inner_text() == "gpubox / gpu 0,1"
    # Filter by status: in the URL, and the table shows only those.
    page.select_option("select[name=status]", "running")
    page.wait_for_function("location.hash.includes('status=running')")
    page.wait_for_function(
        "[...document.querySelectorAll('.runs tbody .badge')]"
        ".every((b) => b.textContent === 'running')"
    )
    assert row.is_visible()
    with db.session(service.engine) as s:
        runs.mark_finished(s, run_id, "succeeded", summary={"final_val_err": 0.1234})
    row.wait_for(state="detached", timeout=10_000)  # no longer running: filtered out
    page.select_option("select[name=status]", "")
    page.locator("input[name=q]").fill("watch me")
    row.wait_for()
    assert row.locator("td").nth(11).inner_text() == "12.34%"
    visible = page.locator(".runs tbody tr:visible").count()
    assert visible == 1


def test_select_runs_and_compare(page, service, ui) -> None:
    base = ui.seed_run(
        service.engine,
        name="pick baseline",
        spec=ui.full_spec(workers=8, warmup="none"),
        is_baseline=True,
        points=False,
    )
    big = ui.seed_run(
        service.engine,
        name="pick large",
        spec=ui.full_spec(workers=64),
        baseline_id=base,
        points=False,
    )
    ui.open(page, "#/runs?q=pick")
    for run_id in (big, base):
        page.locator(f"tr[data-run-id='{run_id}'] input[type=checkbox]").check()
    assert page.locator(".runs-view .toolbar").inner_text().count("2 selected") == 1
    page.get_by_role("button", name="Compare").click()
    page.wait_for_function("location.hash.startsWith('#/compare')")
    assert f"runs={base},{big}" in page.url and f"baseline={base}" in page.url
    ui.wait_drawn(page, "compare")
