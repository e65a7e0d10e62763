"""A queued run that no live worker will take says why: on the runs table, on its page,
and on the New run form before it is submitted. The session's worker serves ``cpu``
only, so a ``device: cuda`` run waits on ``gpu`` until a GPU worker beats."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = pytest.mark.browser

REASON = "no live worker serves queue gpu"


@pytest.fixture()
def gpu_worker(service) -> Iterator[Any]:
    """beat() records a fake GPU worker's heartbeat; it is gone after the test, so later
    tests' ``device: auto`` runs still go to the real CPU worker."""
    from store import db, models, runs

    def beat() -> None:
        with db.session(service.engine) as s:
            runs.record_worker(s, name="gpu0@fakebox", host="fakebox", gpus="0", queues=["gpu"])

    yield beat
    with db.session(service.engine) as s:
        if (row := s.get(models.WorkerBeat, "gpu0@fakebox")) is not None:
            s.delete(row)


def test_queued_run_shows_why_it_waits(page, service, ui, gpu_worker) -> None:
    from store import db, runs

    # As POST /api/runs stores it: queued, its message on the gpu queue.
    spec = ui.full_spec(device="cuda")
    run_id = ui.seed_run(service.engine, name="gpu", spec=spec, status="queued", points=False)
    with db.session(service.engine) as s:
        assert runs.record_queue(s, run_id, "gpu")
    try:
        ui.open(page, "#/runs")
        status = page.locator(f"tr[data-run-id='{run_id}'] td").nth(3)
        status.wait_for()
        page.wait_for_function(
            "([id, text]) => document.querySelector(`tr[data-run-id='${id}'] td:nth-child(4)`)"
            "?.textContent === text",
            arg=[run_id, f"queued — {REASON}"],
        )

        ui.open(page, f"#/run/{run_id}")
        waiting = page.locator(".run-view .waiting")
        waiting.wait_for()
        assert waiting.inner_text() == f"Queued — {REASON}."
        # A GPU worker starts: the page's live status drops the reason.
        gpu_worker()
        waiting.wait_for(state="hidden", timeout=10_000)

        ui.open(page, "#/runs")
        page.wait_for_function(
            "(id) => document.querySelector(`tr[data-run-id='${id}'] td:nth-child(4)`)"
            "?.textContent === 'queued'",
            arg=run_id,
            timeout=10_000,
        )
    finally:
        with db.session(service.engine) as s:
            runs.delete_run(s, run_id)


def test_new_run_form_warns_about_a_queue_nobody_serves(page, ui) -> None:
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    warning = page.locator("form.newrun .queue-warning")
    page.locator("form.newrun [name=device]").select_option("cuda")
    warning.wait_for()
    assert warning.inner_text().startswith(f"{REASON}: the run waits until one starts")
    # Back to the CPU, which the session's worker serves: no warning.
    page.locator("form.newrun [name=device]").select_option("cpu")
    warning.wait_for(state="hidden")
