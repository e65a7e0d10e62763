"""User text (run names, error messages) is shown as text everywhere, never as markup."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

EVIL_NAME = '<img src=x onerror="window.__xss=1">'
EVIL_ERROR = "<script>window.__xss=2</script><b>boom</b>"


@pytest.fixture(scope="module")
def evil_runs(service, ui) -> list[int]:
    # Two specs that differ only where legends do not look (checkpointing): the compare
    # legend then tells them apart by their names.
    spec = ui.full_spec(workers=4, epochs=2, warmup_epochs=1, milestones=[1])
    return [
        ui.seed_run(service.engine, name=EVIL_NAME, spec=spec, status="failed", error=EVIL_ERROR),
        ui.seed_run(service.engine, name=EVIL_NAME + " 2", spec={**spec, "checkpoint": False}),
    ]


def no_injection(page) -> None:
    assert page.evaluate("window.__xss") is None
    assert page.locator("main img, main script, main b").count() == 0


def test_runs_table_shows_names_as_text(page, evil_runs, ui) -> None:
    ui.open(page, "#/runs")
    row = page.locator(f"tr[data-run-id='{evil_runs[0]}']")
    row.wait_for()
    assert row.locator("td.name a").inner_text() == EVIL_NAME
    assert EVIL_ERROR in row.locator("td.name a").get_attribute("title")
    no_injection(page)


def test_run_page_shows_name_and_error_as_text(page, evil_runs, ui) -> None:
    ui.open(page, f"#/run/{evil_runs[0]}")
    ui.wait_drawn(page, "run")
    assert page.locator(".run-view h1").inner_text() == EVIL_NAME
    assert page.locator(".run-view .error-box").inner_text() == EVIL_ERROR
    no_injection(page)


def test_compare_legend_and_picker_show_names_as_text(page, evil_runs, ui) -> None:
    ui.open(page, f"#/compare?runs={evil_runs[0]},{evil_runs[1]}")
    ui.wait_drawn(page, "compare")
    legend = page.locator("#compare-chart .legendtext").all_text_contents()
    assert any(EVIL_NAME in text for text in legend), legend
    picker = page.locator(".picker-list").text_content()
    assert EVIL_NAME in picker
    no_injection(page)
    assert page.locator("#compare-chart image").count() == 0
