"""The full run page: every x axis, smoothing and log y from the URL (each URL the page
writes reproduces its view), timing and system-metric panels, the run's log following
live, empty states instead of empty axes, and the management controls (rename, tags,
notes, archive, downloads, train N more epochs, the parent link)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = pytest.mark.browser

SYS = ("sys/cpu_percent", "sys/mem_rss_mb", "sys/gpu_util", "sys/gpu_mem_mb", "sys/gpu_power_w")


def add_points(engine: Any, run_id: int, total: int, ipe: int) -> None:
    """Timings and system samples beside seed_run's curves, as the trainer and the
    worker's sampler write them."""
    from store.metrics import MetricWriter

    with MetricWriter(engine, run_id) as writer:
        for step in range(total):
            values: dict[str, float] = {"step_time": 0.02 + 0.01 * (step % 3)}
            if step % 4 == 0 and step >= 40:  # the sampler's first point comes seconds in
                values.update({k: 10.0 + step for k in SYS})
            if (step + 1) % ipe == 0:
                values.update(epoch_time=1.5, data_time=0.25, compute_time=1.1)
            writer.add(step, values, epoch=(step + 1) / ipe, wall_time=0.01 * (step + 1))


def add_log(engine: Any, run_id: int, lines: list[tuple[str, str]]) -> None:
    from store import db
    from store.logs import LogLine, append_log

    with db.session(engine) as s:
        append_log(s, run_id, [LogLine(stream, text) for stream, text in lines])


@pytest.fixture(scope="module")
def finished(service, ui) -> int:
    spec = ui.full_spec(epochs=4, milestones=[2])  # 20480 / 256 = 80 iterations per epoch
    run_id = ui.seed_run(service.engine, name="full page", spec=spec)
    add_points(service.engine, run_id, 320, 80)
    add_log(service.engine, run_id, [("stdout", "epoch 1 done"), ("stderr", "a warning")])
    return run_id


def chart(page: Any, panel: str) -> dict[str, Any]:
    return page.evaluate(
        "(p) => { const el = document.getElementById('chart-' + p);"
        " return {data: el.data, layout: el.layout}; }",
        panel,
    )


def test_every_url_the_page_writes_reproduces_its_view(page, finished, ui) -> None:
    ui.open(page, f"#/run/{finished}")
    ui.wait_drawn(page, "run")
    # Each control writes the URL ...
    page.select_option("select[name=x]", "samples")
    ui.wait_drawn(page, "run", 1)
    page.wait_for_function("location.hash.includes('x=samples')")
    page.locator("input[name=smooth]").fill("0.6")
    page.locator("input[name=logy]").check()
    page.wait_for_function(
        "location.hash.includes('smooth=0.6') && location.hash.includes('logy=1')"
    )
    written = page.evaluate("location.hash")
    # ... and that URL, loaded afresh, is the same view.
    page.reload()
    ui.open(page, written)
    ui.wait_drawn(page, "run")
    assert page.locator("select[name=x]").input_value() == "samples"
    assert page.locator("input[name=smooth]").input_value() == "0.6"
    assert page.locator("input[name=logy]").is_checked()
    loss = chart(page, "loss")
    assert loss["layout"]["xaxis"]["title"]["text"] == "samples seen"
    assert loss["layout"]["yaxis"]["type"] == "log"
    smoothed, raw = loss["data"][0], loss["data"][2]
    assert smoothed["x"][:3] == [256, 512, 768]  # (step + 1) x kn
    assert raw["visible"] is True and raw["y"] != smoothed["y"]
    assert smoothed["y"][0] == pytest.approx(raw["y"][0])  # debiased: no pull towards 0
    # The LR panel is never smoothed nor log-scaled.
    lr = chart(page, "lr")
    assert lr["layout"]["yaxis"]["type"] == "linear" and len(lr["data"]) == 1

    # Wall time, no smoothing: the raw curve is the line itself.
    ui.open(page, f"#/run/{finished}?x=wall_time")
    ui.wait_drawn(page, "run")
    loss = chart(page, "loss")
    assert loss["layout"]["xaxis"]["title"]["text"] == "wall time (s)"
    assert loss["data"][0]["x"][:2] == [0.01, 0.02]
    assert loss["data"][2]["visible"] is False


def test_timings_and_system_metrics_are_plotted(page, finished, ui) -> None:
    ui.open(page, f"#/run/{finished}")
    ui.wait_drawn(page, "run")
    for panel in ("step-time", "throughput", "epoch-time", "sys-util", "sys-mem", "sys-power"):
        assert page.locator(f".panel[data-panel='{panel}']").is_visible(), panel
    step_time = chart(page, "step-time")["data"][0]
    assert step_time["y"][:3] == pytest.approx([0.02, 0.03, 0.04])
    throughput = chart(page, "throughput")["data"][0]
    assert throughput["y"][:2] == pytest.approx([256 / 0.02, 256 / 0.03])  # kn / step time
    epoch = chart(page, "epoch-time")["data"]
    assert [t["name"] for t in epoch] == ["epoch", "data", "compute"]
    assert epoch[1]["y"] == [0.25] * 4
    util = chart(page, "sys-util")["data"]
    assert util[0]["x"][:2] == [40, 44] and util[1]["y"][0] == 10.0 + 40
    # The system panels start at the run's start, aligned with the training panels.
    start = "(p) => document.getElementById('chart-' + p)._fullLayout.xaxis.range[0]"
    assert page.evaluate(start, "sys-util") <= 0 and page.evaluate(start, "step-time") <= 0
    assert chart(page, "sys-power")["data"][0]["y"][-1] == 10.0 + 316


def test_log_of_a_finished_run(page, finished, ui) -> None:
    ui.open(page, f"#/run/{finished}")
    ui.wait_drawn(page, "run")
    log = page.locator(".run-log")
    log.locator(".log-line").nth(1).wait_for()
    assert log.inner_text().splitlines() == ["epoch 1 done", "a warning"]
    assert log.locator(".log-stderr").inner_text().strip() == "a warning"


def test_empty_states(page, service, ui) -> None:
    from store import db, runs

    queued = ui.seed_run(
        service.engine,
        name="waiting",
        spec=ui.full_spec(device="cuda"),
        status="queued",
        points=False,
    )
    ui.open(page, f"#/run/{queued}")
    box = page.locator(".run-view .empty-state")
    box.wait_for()
    assert box.inner_text().startswith("Waiting for a worker")
    assert not page.locator(".run-view .run-charts").is_visible()

    failed = ui.seed_run(
        service.engine,
        name="broken",
        spec=ui.full_spec(),
        status="failed",
        error="trainer.RunConfigError: data_root '/x' is not a folder",
        points=False,
    )
    add_log(service.engine, failed, [("error", "Traceback (most recent call last):\n  boom")])
    ui.open(page, f"#/run/{failed}")
    ui.wait_drawn(page, "run")
    box.wait_for()
    text = box.inner_text()
    assert text.startswith("Failed before the first iteration")
    assert "data_root '/x' is not a folder" in text
    assert not page.locator(".run-view .run-charts").is_visible()
    page.locator(".run-log .log-error").first.wait_for()
    assert "Traceback (most recent call last):" in page.locator(".run-log").inner_text()

    starting = ui.seed_run(
        service.engine, name="starting", spec=ui.full_spec(), status="running", points=False
    )
    try:
        ui.open(page, f"#/run/{starting}")
        ui.wait_drawn(page, "run")
        box.wait_for()
        assert box.inner_text().startswith("Starting…")
        # The first point arrives: the plots replace the message.
        from store.metrics import MetricWriter

        with MetricWriter(service.engine, starting) as w:
            w.add(0, {"loss": 2.0, "train_err": 0.9, "lr": 0.1}, epoch=0.01, wall_time=0.1)
        box.wait_for(state="hidden", timeout=10_000)
        page.wait_for_function("document.getElementById('chart-loss').data[0].x.length === 1")
        assert page.locator("#chart-loss").is_visible()
    finally:
        with db.session(service.engine) as s:
            runs.request_cancel(s, starting)
            runs.mark_finished(s, starting, "cancelled")


def test_failing_run_shows_its_traceback(page, service, ui) -> None:
    """A real run on the session's worker fails; its log holds the traceback."""
    spec = {
        "model": "mlp",
        "dataset": "mnist",
        "data_root": "/nonexistent/mnist",
        "dataset_size": 100,
        "epochs": 1,
        "batch_per_worker": 10,
        "warmup": "none",
        "milestones": [],
        "device": "cpu",
    }
    answer = service.http.post("/api/runs", json={"name": "fails", "spec": spec})
    assert answer.status_code == 201, answer.text
    run_id = answer.json()["run"]["id"]
    ui.open(page, f"#/run/{run_id}")
    page.wait_for_selector(".run-view .badge.s-failed", timeout=90_000)
    page.wait_for_function(
        "document.querySelector('.run-log').textContent.includes('Traceback')", timeout=15_000
    )
    text = page.locator(".run-log").inner_text()
    assert "trainer.RunConfigError: data_root '/nonexistent/mnist' is not a folder" in text
    assert (
        page.locator(".run-view .empty-state")
        .inner_text()
        .startswith("Failed before the first iteration")
    )


def test_log_follows_the_tail_unless_scrolled_up(page, service, ui) -> None:
    from store import db, runs

    run_id = ui.seed_run(
        service.engine, name="chatty", spec=ui.full_spec(), status="running", points=False
    )
    try:
        add_log(service.engine, run_id, [("stdout", f"line {i}") for i in range(200)])
        ui.open(page, f"#/run/{run_id}")
        log = page.locator(".run-log")
        page.wait_for_function("document.querySelectorAll('.run-log .log-line').length === 200")
        at_bottom = (
            "(() => { const el = document.querySelector('.run-log');"
            " return el.scrollTop + el.clientHeight >= el.scrollHeight - 2; })()"
        )
        assert page.evaluate(at_bottom)
        add_log(service.engine, run_id, [("stdout", "line 200")])
        page.wait_for_function(
            "document.querySelector('.run-log').textContent.includes('line 200')"
        )
        page.wait_for_function(at_bottom)
        # Scrolled up: new lines arrive, the view stays where the reader is.
        log.evaluate("el => { el.scrollTop = 0; }")
        add_log(service.engine, run_id, [("stdout", "line 201")])
        page.wait_for_function(
            "document.querySelector('.run-log').textContent.includes('line 201')"
        )
        assert log.evaluate("el => el.scrollTop") == 0
    finally:
        with db.session(service.engine) as s:
            runs.request_cancel(s, run_id)
            runs.mark_finished(s, run_id, "cancelled")


def test_management_controls(page, service, ui) -> None:
    from store import db, runs

    run_id = ui.seed_run(
        service.engine, name="to manage", spec=ui.full_spec(epochs=2, milestones=[1])
    )
    ui.open(page, f"#/run/{run_id}")
    ui.wait_drawn(page, "run")
    # Rename, tags, notes.
    page.get_by_role("button", name="edit").click()
    editor = page.locator("form.run-editor")
    editor.locator("input[name=name]").fill("renamed run")
    editor.locator("input[name=tags]").fill("paper, fig2")
    editor.locator("textarea[name=notes]").fill("kn=256 reference")
    editor.get_by_role("button", name="Save").click()
    page.wait_for_function("document.querySelector('.run-view h1').textContent === 'renamed run'")
    assert page.locator(".run-meta .tag").all_inner_texts() == ["paper", "fig2"]
    assert page.locator(".run-notes").inner_text() == "kn=256 reference"
    got = service.http.get(f"/api/runs/{run_id}").json()
    assert (got["name"], got["tags"], got["notes"]) == (
        "renamed run",
        ["paper", "fig2"],
        "kn=256 reference",
    )
    # Archive and back.
    page.get_by_role("button", name="archive").click()
    page.locator(".archived-flag").wait_for()
    assert service.http.get(f"/api/runs/{run_id}").json()["archived"] is True
    page.get_by_role("button", name="unarchive").click()
    page.locator(".archived-flag").wait_for(state="hidden")
    # Downloads.
    assert (
        page.get_by_role("link", name="CSV").get_attribute("href")
        == f"/api/runs/{run_id}/metrics.csv"
    )
    assert page.get_by_role("link", name="Parquet").get_attribute("href") == (
        f"/api/runs/{run_id}/metrics.parquet"
    )
    checkpoint = page.locator("a.checkpoint-link")
    assert checkpoint.get_attribute("href") == f"/api/runs/{run_id}/checkpoint"

    # Train 2 more epochs: a new run, linked to this one.
    from store.runs import get_run

    with db.session(service.engine) as s:
        uid = get_run(s, run_id).uid
    folder = service.home / "runs" / uid
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "checkpoint.pt").write_bytes(b"not a real checkpoint")
    page.locator("input[name=extend_epochs]").fill("2")
    page.get_by_role("button", name="Train").click()
    page.wait_for_function("(id) => !location.hash.startsWith(`#/run/${id}`)", arg=run_id)
    child = int(page.evaluate("location.hash").split("/")[2].split("?")[0])
    try:
        parent = page.locator(".run-view a.parent-link")
        parent.wait_for()
        assert parent.inner_text() == f"run {run_id}"
        # The parent's 2 epochs + 2 more.
        page.locator(".run-view .facts dd", has_text="× 64 it = 256 it").wait_for()
        assert (
            page.locator(".run-view .facts dd", has_text="256 it").inner_text().startswith("4 × ")
        )
        parent.click()
        page.wait_for_function("(id) => location.hash === `#/run/${id}`", arg=run_id)
    finally:
        with db.session(service.engine) as s:
            runs.delete_run(s, child)
    time.sleep(0)  # nothing to wait for: the child run's worker attempt is gone with it
