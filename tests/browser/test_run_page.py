"""The run page of a finished run: its curves from the history, the divergence marked on
every panel, the error, the x axis in the URL, and no cancel button once it is over."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def diverged(service, ui) -> int:
    return ui.seed_run(
        service.engine,
        name="kn=8k no warmup",
        spec=ui.full_spec(workers=256, warmup="none"),
        status="diverged",
        error="loss 61.2 exceeded 20 x its start at iteration 13",
        diverged_step=13,
    )


def test_diverged_run(page, diverged, ui) -> None:
    ui.open(page, f"#/run/{diverged}")
    ui.wait_drawn(page, "run")
    assert page.locator(".run-view .badge").inner_text() == "diverged"
    assert page.locator(".run-view .error-box").inner_text() == (
        "Diverged at iteration 13.\nloss 61.2 exceeded 20 x its start at iteration 13"
    )
    assert not page.get_by_role("button", name="Cancel").is_visible()
    # 10 epochs x 2 iterations: the whole history, and a dashed line at iteration 13.
    for panel in ("loss", "err", "lr", "grad"):
        layout = page.evaluate(f"document.getElementById('chart-{panel}').layout")
        assert [s["x0"] for s in layout["shapes"]] == [13], panel
    assert page.evaluate("document.getElementById('chart-loss').data[0].x") == list(range(20))
    # Per epoch: the same marker moves to epoch 13 / 2 iterations per epoch.
    page.select_option("select[name=x]", "epoch")
    ui.wait_drawn(page, "run", 2)
    page.wait_for_function("location.hash.endsWith('?x=epoch')")
    page.wait_for_function(
        "document.getElementById('chart-loss').layout.xaxis.title.text === 'epoch'"
    )
    shapes = page.evaluate("document.getElementById('chart-err').layout.shapes")
    assert [s["x0"] for s in shapes] == [6.5]
    # The val error per epoch, in percent (seed_run logs level + 0.02 at each epoch end).
    val = page.evaluate("document.getElementById('chart-err').data[1]")
    assert val["x"] == [float(e) for e in range(1, 11)]
    assert all(0 < v < 100 for v in val["y"])
