"""Parallel coordinates of a sweep or a selection of runs: one axis per spec field that
differs (plus k·n and peak LR), the final validation error last, one line per run."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

PARCOORDS_JS = """() => {
    const t = document.getElementById('parallel-chart').data[0];
    return {type: t.type, runs: t.meta.runs,
            dims: t.dimensions.map((d) => ({label: d.label, values: Array.from(d.values),
                                            ticktext: d.ticktext || null,
                                            tickvals: d.tickvals ? Array.from(d.tickvals) : null,
                                            tickformat: d.tickformat || null}))};
}"""


@pytest.fixture(scope="module")
def parallel_sweep(service, ui) -> dict[str, object]:
    from store import db, runs

    with db.session(service.engine) as s:
        group = runs.create_group(
            s,
            name="parallel sweep",
            kind="sweep",
            spec=ui.full_spec(),
            batch_sizes=[512, 1024],
            seeds=[0],
        ).id
    ids = []
    for workers, norm, err in ((16, "bn_local", 0.21), (32, "bn_local", 0.22), (32, "gn", 0.25)):
        ids.append(
            ui.seed_run(
                service.engine,
                name=f"par {workers} {norm}",
                group_id=group,
                points=False,
                spec=ui.full_spec(workers=workers, norm=norm),
                summary={"final_val_err": err},
            )
        )
    queued = ui.seed_run(
        service.engine,
        name="par queued",
        group_id=group,
        status="queued",
        points=False,
        spec=ui.full_spec(workers=64),
    )
    return {"group": group, "ids": ids, "queued": queued}


def test_sweep_draws_one_line_per_finished_run(page, parallel_sweep, ui) -> None:
    group, ids = parallel_sweep["group"], parallel_sweep["ids"]
    ui.open(page, f"#/sweep/{group}")
    ui.wait_drawn(page, "sweep")
    page.locator(".sweep-view a", has_text="Parallel coordinates").click()
    detail = ui.wait_drawn(page, "parallel")
    assert f"#/parallel?group={group}" in page.url
    fig = page.evaluate(PARCOORDS_JS)
    assert fig["type"] == "parcoords"
    assert sorted(fig["runs"]) == sorted(ids)  # the queued run has no error: left out
    assert detail["lines"] == 3
    labels = [d["label"] for d in fig["dims"]]
    # Only what differs among the runs, the error last.
    assert labels == ["k·n", "norm", "workers", "peak LR", "final val err (%)"]
    assert all(len(d["values"]) == 3 for d in fig["dims"])
    by = {d["label"]: d for d in fig["dims"]}
    # k·n and peak LR on a log2 scale (parcoords has no log axis), a tick at each value;
    # numbers labelled with 3 significant digits.
    assert by["k·n"]["values"] == [9, 10, 10]
    assert by["k·n"]["tickvals"] == [9, 10] and by["k·n"]["ticktext"] == ["512", "1024"]
    assert all(len(t.replace(".", "").lstrip("0")) <= 3 for t in by["peak LR"]["ticktext"])
    assert by["final val err (%)"]["tickformat"] == ".3~g"
    assert by["norm"]["ticktext"] == ["bn_local", "gn"] and by["norm"]["values"] == [0, 0, 1]
    assert by["final val err (%)"]["values"] == pytest.approx([21, 22, 25])
    assert "1 without a final val err yet left out" in page.locator(".parallel-view").inner_text()


def test_a_selection_and_its_link(page, parallel_sweep, ui) -> None:
    a, b, _ = parallel_sweep["ids"]
    ui.open(page, f"#/parallel?runs={a},{b}&err=best")
    ui.wait_drawn(page, "parallel")
    # best_val_err of seed_run is final_err itself: both runs have one.
    fig = page.evaluate(PARCOORDS_JS)
    assert fig["runs"] == [a, b]
    assert [d["label"] for d in fig["dims"]][-1] == "best val err (%)"
    assert page.locator("select[name=err]").input_value() == "best"
    page.select_option("select[name=err]", "final")
    ui.wait_drawn(page, "parallel", 2)
    assert "err=" not in page.url and f"runs={a},{b}" in page.url


def test_fewer_than_two_runs_say_how_to_pick_them(page, ui) -> None:
    ui.open(page, "#/parallel")
    ui.wait_drawn(page, "parallel")
    assert "Not enough finished runs" in page.locator(".parallel-view .empty").inner_text()
