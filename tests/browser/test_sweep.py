"""The sweep summary: Figure 1 (final validation error against k·n on a log2 axis, the
baseline as a band) and seed 004's table (time and iterations to target, oscillation)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.browser

SIZES = [1024, 4096, 8192]
SEEDS = [0, 1]


def final_err(kn: int, seed: int) -> float:
    """Flat up to 4k, worse at 8k, as the paper's Figure 1; seeds differ a little."""
    return (0.22 if kn <= 4096 else 0.26) + 0.01 * seed


def target_iters(kn: int, seed: int) -> int:
    return 20480 // kn * 4 + seed


@pytest.fixture(scope="module")
def sweep(service, ui) -> dict[str, object]:
    from store import db, runs

    spec = ui.full_spec(target_accuracy=0.7)
    with db.session(service.engine) as s:
        group = runs.create_group(
            s, name="figure 1", kind="sweep", spec=spec, batch_sizes=SIZES, seeds=SEEDS
        ).id
    ids: dict[tuple[int, int], int] = {}
    for sd in SEEDS:
        ids[(256, sd)] = ui.seed_run(
            service.engine,
            name=f"baseline {sd}",
            group_id=group,
            is_baseline=True,
            points=False,
            spec=ui.full_spec(workers=8, warmup="none", seed=sd, target_accuracy=0.7),
            summary={"final_val_err": 0.21 + 0.01 * sd, "iters_to_target": 300 + sd},
        )
    for kn in SIZES:
        for sd in SEEDS:
            ids[(kn, sd)] = ui.seed_run(
                service.engine,
                name=f"kn={kn} seed {sd}",
                group_id=group,
                baseline_id=ids[(256, 0)],
                points=False,
                spec=ui.full_spec(workers=kn // 32, seed=sd, target_accuracy=0.7),
                summary={
                    "final_val_err": final_err(kn, sd),
                    "iters_to_target": target_iters(kn, sd),
                    "time_to_target_s": 10.0 + sd,
                    "loss_oscillation": 0.05 * kn / 1024,
                    "samples_per_s": 1000.0 * kn / 256,
                },
            )
    return {"group": group, "ids": ids}


def test_figure1_and_table(page, sweep, ui) -> None:
    ui.open(page, f"#/sweep/{sweep['group']}")
    ui.wait_drawn(page, "sweep")
    traces = page.evaluate(
        """() => document.getElementById('sweep-chart').data.map((t) => ({
            role: t.meta.role, name: t.name, x: Array.from(t.x), y: Array.from(t.y),
            fill: t.fill}))"""
    )
    by_role = {t["role"]: t for t in traces}
    # The baseline's error (mean of its 2 seeds: 21.5%) as a line inside a ±std band.
    assert by_role["baseline"]["y"][0] == pytest.approx(21.5)
    assert by_role["band-hi"]["fill"] == "tonexty"
    assert by_role["band-lo"]["y"][0] == pytest.approx(21.0)
    assert by_role["band-hi"]["y"][0] == pytest.approx(22.0)
    assert "baseline kn=256: 21.50% ± 0.50 (2 seeds)" in by_role["baseline"]["name"]
    # The mean per batch size and every run as a point, on a log2 axis labelled 1k, 8k.
    mean = by_role["mean"]
    assert mean["x"] == SIZES
    assert mean["y"] == pytest.approx(
        [100 * (final_err(k, 0) + final_err(k, 1)) / 2 for k in SIZES]
    )
    assert sorted(by_role["seeds"]["x"]) == sorted(k for k in SIZES for _ in SEEDS)
    xaxis = page.evaluate("document.getElementById('sweep-chart').layout.xaxis")
    assert xaxis["type"] == "log"
    assert dict(zip(xaxis["tickvals"], xaxis["ticktext"], strict=True))[8192] == "8k"

    # Seed 004's table: one row per batch size (the baseline first), means ± std.
    rows = page.locator(".sweep-table tbody tr")
    assert rows.count() == 4
    assert rows.nth(0).get_attribute("data-kn") == "256" and "baseline" in rows.nth(0).inner_text()
    head = page.locator(".sweep-table thead th").all_inner_texts()
    row8k = dict(zip(head, page.locator("tr[data-kn='8192'] td").all_inner_texts(), strict=True))
    assert row8k["k × n"] == "256 × 32"
    assert row8k["peak LR"] == "3.2"
    assert row8k["iters to target"] == "8.5 ± 0.5"
    assert row8k["time to target"] == "10.5 s ± 0.5 s"
    assert row8k["loss oscillation"] == "0.4"
    assert row8k["samples/s"] == "32000"
    assert row8k["final val err"] == "26.50% ± 0.50%"
    assert "Target: 70.0% validation accuracy" in page.locator(".sweep-view").inner_text()


def test_error_choice_and_compare_link(page, sweep, ui) -> None:
    ui.open(page, f"#/sweep/{sweep['group']}?err=median5")
    ui.wait_drawn(page, "sweep")
    mean = page.evaluate(
        "document.getElementById('sweep-chart').data.find((t) => t.meta.role === 'mean').y"
    )
    # seed_run's default median_last5_val_err is final_err + 0.025 with final_err = 0.2.
    assert mean == pytest.approx([22.5, 22.5, 22.5])
    page.locator("tr[data-kn='4096'] td a").first.click()
    ui.wait_drawn(page, "compare")
    ids = sweep["ids"]
    assert f"baseline={ids[(256, 0)]}" in page.url
    wanted = sorted([ids[(4096, 0)], ids[(4096, 1)], ids[(256, 0)], ids[(256, 1)]])
    assert "runs=" + ",".join(map(str, wanted)) in page.url
