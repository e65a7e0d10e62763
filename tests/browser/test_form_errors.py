"""The New run form's cross-field errors (issue 12, points 5 and 6): an error shows on the
field the user just changed as well as on the field the rule names; the defaults are
consistent (milestones inside training) and milestones follow a change of epochs."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

SMALL = {"model": "mlp", "dataset": "synthetic", "dataset_size": "400"}


def fill(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        el = page.locator(f"form.newrun [name={name}]")
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(value)
        else:
            el.fill(value)


def error_of(page, field: str) -> str:
    return page.locator(f".field[data-field={field}] .err").inner_text()


def open_form(page, ui) -> None:
    ui.open(page, "#/new")
    page.locator("form.newrun").wait_for()
    page.get_by_role("button", name="reset to defaults").click()


def test_total_batch_error_shows_on_the_field_edited(page, ui) -> None:
    open_form(page, ui)
    fill(page, {**SMALL, "batch_per_worker": "32"})
    fill(page, {"workers": "64"})  # 64 x 32 > 320 training samples
    page.wait_for_function(
        "document.querySelector('.field[data-field=workers] .err').textContent.includes('larger')"
    )
    assert "total batch k*n = 64*32" in error_of(page, "workers")
    assert "larger than the training set" in error_of(page, "batch_per_worker")
    assert "invalid" in page.locator(".field[data-field=workers]").get_attribute("class")


def test_defaults_plan_without_errors_and_late_milestones_are_named(page, ui) -> None:
    open_form(page, ui)
    assert page.locator("form.newrun [name=epochs]").input_value() == "20"
    assert page.locator("form.newrun [name=milestones]").input_value() == "6.67, 13.33, 17.78"
    ui.wait_drawn(page, "new")
    assert page.locator(".field.invalid").count() == 0
    # Epochs changed, milestones untouched: they follow (the paper's 30/60/80 of 90).
    fill(page, {"epochs": "9"})
    assert page.locator("form.newrun [name=milestones]").input_value() == "3, 6, 8"
    # Typed milestones past the end: refused, on milestones and on the field edited.
    fill(page, {"milestones": "3, 6, 9"})
    page.wait_for_function(
        "document.querySelector('.field[data-field=milestones] .err').textContent.length > 0"
    )
    assert "past the end of training (epochs=9)" in error_of(page, "milestones")
    fill(page, {"epochs": "8"})
    page.wait_for_function(
        "document.querySelector('.field[data-field=epochs] .err').textContent.length > 0"
    )
    assert "milestones [9]" in error_of(page, "epochs")


def test_cancel_asks_for_confirmation(page, service, ui) -> None:
    run_id = ui.seed_run(service.engine, name="keep me", spec=ui.full_spec(), status="queued")
    ui.open(page, f"#/run/{run_id}")
    button = page.get_by_role("button", name="Cancel")
    button.wait_for()
    asked: list[str] = []

    def dismiss(dialog) -> None:
        asked.append(dialog.message)
        dialog.dismiss()

    page.once("dialog", dismiss)
    button.click()
    page.wait_for_timeout(300)
    assert asked and f"Cancel run {run_id}?" in asked[0]
    assert service.http.get(f"/api/runs/{run_id}").json()["status"] == "queued"

    page.once("dialog", lambda d: d.accept())
    button.click()
    page.wait_for_selector(".run-view .badge.s-cancelled")
