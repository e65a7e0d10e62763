"""The New run form: its fields against RunSpec, the live LR preview, 422 errors shown next
to the field they name, and submissions (run with baseline, sweep) to the real server."""

from __future__ import annotations

import pytest

from trainer.spec import RunSpec

pytestmark = pytest.mark.browser

# Small enough for any check: 320 synthetic training samples.
SMALL = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": "400",
    "epochs": "2",
    "warmup_epochs": "1",
}


def fill(page, values: dict[str, str]) -> None:
    for name, value in values.items():
        el = page.locator(f"form.newrun [name={name}]")
        if el.evaluate("e => e.tagName") == "SELECT":
            el.select_option(value)
        else:
            el.fill(value)


def field_error(page, field: str) -> str:
    return page.locator(f".field[data-field={field}] .err").inner_text()


def test_form_fields_match_runspec(page, ui) -> None:
    """Every RunSpec field is in the form with RunSpec's default, choices and nullability."""
    ui.open(page, "#/runs")
    fields = page.evaluate("async () => (await import('/static/js/spec_fields.js')).FIELDS")
    schema = RunSpec.model_json_schema()["properties"]
    defaults = RunSpec().model_dump()
    assert [f["name"] for f in fields] == list(schema)
    for f in fields:
        prop = schema[f["name"]]
        assert f["default"] == defaults[f["name"]], f["name"]
        variants = prop.get("anyOf", [prop])
        enum = next((v["enum"] for v in variants if "enum" in v), None)
        assert (f["kind"] == "select") == (enum is not None), f["name"]
        if enum is not None:
            assert f["options"] == enum, f["name"]
        nullable = any(v.get("type") == "null" for v in variants)
        assert bool(f.get("nullable")) == nullable, f["name"]


def test_batch_size_shorthand(page, ui) -> None:
    ui.open(page, "#/runs")
    parse = "async (t) => (await import('/static/js/newrun.js')).parseBatchSizes(t)"
    assert page.evaluate(parse, "32, 64, 128, ..., 4096") == [2**e for e in range(5, 13)]
    assert page.evaluate(parse, "256 ... 1k") == [256, 512, 1024]
    assert page.evaluate(parse, "100, 300, ..., 2700") == [100, 300, 900, 2700]
    assert page.evaluate(parse, "32, x7") == [32, "x7"]  # kept for the server to name


def test_lr_preview_follows_the_form(page, service, ui) -> None:
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    before = page.evaluate("window.__drawn.filter(d => d.view === 'new').length")
    fill(
        page,
        {
            **SMALL,
            "workers": "8",
            "batch_per_worker": "32",
            "base_lr": "0.1",
            "warmup": "gradual",
            "warmup_epochs": "1",
        },
    )
    page.wait_for_function("document.querySelector('[data-stat=\"k·n\"]')?.textContent === '256'")
    ui.wait_drawn(page, "new", before + 1)
    # 8 x 32 on 320 samples: one iteration per epoch, peak = 0.1 * 256/256.
    assert page.locator('[data-stat="peak LR"]').inner_text() == "0.1"
    assert page.locator('[data-stat="iters / epoch"]').inner_text() == "1"
    # The drawn curve is the server's schedule for exactly this spec.
    spec = {k: (int(v) if v.isdigit() else v) for k, v in SMALL.items()}
    expected = service.http.post(
        "/api/schedule",
        json={**spec, "workers": 8, "batch_per_worker": 32, "warmup_epochs": 1},
    ).json()
    drawn = page.evaluate("document.getElementById('lr-preview').data[0].y")
    assert drawn == pytest.approx(expected["lr"])
    # The state is in the URL: reopening the link restores the form.
    url = page.url
    assert "workers=8" in url and "dataset=synthetic" in url
    ui.open(page, "#/runs")
    page.wait_for_selector(".runs-view")
    ui.open(page, url[url.index("#") :])
    ui.wait_drawn(page, "new")
    assert page.locator("form.newrun [name=workers]").input_value() == "8"


def test_sweep_preview_draws_the_servers_plan(page, service, ui) -> None:
    """One curve per size of POST /api/plan/sweep's plan (seeds share one), the baseline
    dotted with the server's spec.baseline(); a size that cannot run is named below."""
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    page.locator("input[name=mode][value=sweep]").check()
    values = {**SMALL, "batch_per_worker": "8", "ref_batch": "16"}
    fill(page, {**values, "batch_sizes": "32, 64, 1024", "seeds": "0, 1"})
    page.locator("input[name=baseline]").check()
    names = "[...(document.getElementById('lr-preview').data || [])].map(t => t.name).join()"
    page.wait_for_function(f"{names} === 'kn=32,kn=64,baseline'")
    assert (
        "batch size 1024 gives an invalid spec" in page.locator(".form-side p.muted").inner_text()
    )
    spec = RunSpec.model_validate(values).baseline().model_dump(mode="json")
    expected = service.http.post("/api/schedule", json=spec).json()
    drawn = page.evaluate("document.getElementById('lr-preview').data[2]")
    assert drawn["line"]["dash"] == "dot" and drawn["y"] == pytest.approx(expected["lr"])


def test_422_errors_show_next_to_their_field(page, service, ui) -> None:
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    n_runs = len(service.http.get("/api/runs").json())
    # k*n = 64*16 = 1024 > 320 training samples: RunSpec names batch_per_worker.
    fill(page, {**SMALL, "workers": "64", "batch_per_worker": "16", "name": "too big"})
    page.get_by_role("button", name="Start run").click()
    page.wait_for_selector(".field[data-field=batch_per_worker].invalid")
    assert "larger than the training set" in field_error(page, "batch_per_worker")
    assert page.locator(".field.invalid").count() == 1
    assert page.url.endswith("#/new") or "#/new?" in page.url  # stayed on the form
    # A field that does not parse: the server's message, next to that field.
    fill(page, {"batch_per_worker": "16", "workers": "2", "epochs": "two"})
    page.get_by_role("button", name="Start run").click()
    page.wait_for_selector(".field[data-field=epochs].invalid")
    assert "valid integer" in field_error(page, "epochs")
    assert page.locator(".field[data-field=batch_per_worker].invalid").count() == 0
    # Sweep sizes: the error names the list position.
    fill(page, {"epochs": "2"})
    page.locator("input[name=mode][value=sweep]").check()
    fill(page, {"batch_sizes": "16, 0", "seeds": "0"})
    page.get_by_role("button", name="Start sweep").click()
    page.wait_for_selector(".field[data-field=batch_sizes].invalid")
    assert field_error(page, "batch_sizes").startswith("[1] ")
    assert "greater than or equal to 1" in field_error(page, "batch_sizes")
    assert len(service.http.get("/api/runs").json()) == n_runs  # nothing was stored


def test_nodes_field_and_the_rules_it_shares(page, ui) -> None:
    """`nodes` sits with nproc; the preview's 422s for nodes*nproc not dividing k and for
    backward_splits with nodes > 1 land on the rule's field and on the field just edited."""
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    assert page.locator("fieldset.g-batch .field[data-field=nodes] input").count() == 1
    before = ui.drawn_count(page, "new")
    fill(page, {**SMALL, "workers": "4", "nodes": "2"})
    ui.wait_drawn(page, "new", before + 1)  # a valid spec: the preview draws
    page.wait_for_function("location.hash.includes('nodes=2')")
    assert page.locator(".field.invalid").count() == 0

    fill(page, {"nproc": "4"})  # 2 nodes x 4 processes = 8 do not divide k = 4
    page.wait_for_selector(".field[data-field=nodes].invalid")
    assert "nodes*nproc = 2*4 = 8 must divide workers=4" in field_error(page, "nodes")
    assert "must divide workers=4" in field_error(page, "nproc")  # the field just edited

    fill(page, {"nproc": "1", "nodes": "1", "backward_splits": "2"})
    page.wait_for_selector(".field.invalid", state="detached")
    fill(page, {"nodes": "2"})
    page.wait_for_selector(".field[data-field=backward_splits].invalid")
    assert "set nproc=1 and nodes=1" in field_error(page, "backward_splits")
    assert "set nproc=1 and nodes=1" in field_error(page, "nodes")


def _cancel(service, ids: list[int]) -> None:
    for run_id in ids:
        service.http.post(f"/api/runs/{run_id}/cancel")


def test_submit_with_baseline_and_sweep(page, service, ui) -> None:
    """The form's bodies are what the server takes: a run + baseline, then a sweep."""
    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    fill(
        page,
        {
            **SMALL,
            "workers": "4",
            "batch_per_worker": "16",
            "ref_batch": "16",
            "name": "form + baseline",
        },
    )
    page.locator("input[name=baseline]").check()
    page.get_by_role("button", name="Start run").click()
    page.wait_for_url("**/#/run/*")
    run_id = int(page.url.rsplit("/", 1)[1].split("?")[0])
    run = service.http.get(f"/api/runs/{run_id}").json()
    baseline = service.http.get(f"/api/runs/{run['baseline_id']}").json()
    _cancel(service, [run_id, baseline["id"]])
    assert run["name"] == "form + baseline" and run["spec"]["workers"] == 4
    assert baseline["is_baseline"] and baseline["derived"]["total_batch"] == 16
    page.wait_for_selector("text=Compare with baseline")

    ui.open(page, "#/new")
    ui.wait_drawn(page, "new")
    page.locator("input[name=mode][value=sweep]").check()
    fill(
        page,
        {
            **SMALL,
            "batch_per_worker": "8",
            "ref_batch": "16",
            "batch_sizes": "16, 32, ..., 64",
            "seeds": "0, 1",
            "name": "form sweep",
        },
    )
    page.locator("input[name=baseline]").check()
    page.get_by_role("button", name="Start sweep").click()
    page.wait_for_url("**/#/sweep/*")
    sweep_id = int(page.url.rsplit("/", 1)[1].split("?")[0])
    detail = service.http.get(f"/api/sweeps/{sweep_id}").json()
    _cancel(service, [r["id"] for r in detail["runs"]])
    assert detail["sweep"]["batch_sizes"] == [16, 32, 64]
    assert detail["sweep"]["seeds"] == [0, 1]
    # 3 sizes x 2 seeds; 16 is the reference batch, so it doubles as the baseline.
    assert sorted({r["derived"]["total_batch"] for r in detail["runs"]}) == [16, 32, 64]
    ui.wait_drawn(page, "sweep")


def test_clone_prefills_the_form(page, service, ui) -> None:
    """#/new?from=ID (the run page's Clone) starts from that run's spec."""
    spec = ui.full_spec(workers=64, norm="gn", milestones=[3, 7], target_accuracy=0.9)
    run_id = ui.seed_run(service.engine, name="to clone", spec=spec, points=False)
    ui.open(page, f"#/new?from={run_id}")
    ui.wait_drawn(page, "new")

    def value(name: str) -> str:
        return page.locator(f"form.newrun [name={name}]").input_value()

    assert (value("workers"), value("norm"), value("milestones")) == ("64", "gn", "3, 7")
    assert value("target_accuracy") == "0.9" and value("name") == "to clone (copy)"
    assert page.locator('[data-stat="k·n"]').inner_text() == "2k"
