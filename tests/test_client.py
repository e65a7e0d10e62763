"""batchlab.Client against the real API.

Most tests serve the real app under uvicorn in a thread on a fresh SQLite home; training
progress is played through the store, as a worker writes it. The last test runs
examples/notebook.py end to end against a real server and worker started as processes.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import yaml
from support import free_port, serve_app, stop_process_groups

import batchlab
from batchlab.client import ServerUnavailable, run_id, spec_to_dict
from batchlab.figure import ema

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# A spec that validates quickly and would train in a second: 256 training samples,
# kn = 32 (8 iterations per epoch), baseline kn = 16.
SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 320,
    "epochs": 2,
    "workers": 2,
    "batch_per_worker": 16,
    "ref_batch": 16,
    "base_lr": 0.1,
    "warmup": "gradual",
    "warmup_epochs": 1,
    "milestones": [1],
    "checkpoint": False,
}


@pytest.fixture()
def server(batchlab_home: str) -> Iterator[SimpleNamespace]:
    yield from serve_app()


@pytest.fixture()
def client(server: SimpleNamespace) -> batchlab.Client:
    return batchlab.Client(server.url)


def _store(engine, fn, *args, **kwargs) -> None:
    from store import db

    with db.session(engine) as s:
        fn(s, *args, **kwargs)


# --- submitting and reading runs -------------------------------------------------------------
def test_submit_returns_the_queued_run_with_derived_figures(client) -> None:
    run = client.submit(SPEC, name="kn=32 gradual")
    assert run["status"] == "queued" and run["name"] == "kn=32 gradual"
    assert run["derived"]["total_batch"] == 32
    assert run["derived"]["peak_lr"] == pytest.approx(0.1 * 32 / 16)
    assert run["derived"]["iters_per_epoch"] == 256 // 32
    assert client.run(run["id"]) == client.run(run)  # an id or the run dict


def test_submit_with_baseline_from_a_yaml_file_and_a_runspec(client, tmp_path) -> None:
    from trainer.spec import RunSpec

    path = tmp_path / "large.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "workers": 4}))
    large, base = client.submit(path, baseline=True)
    assert base is not None and base["is_baseline"]
    assert base["derived"]["total_batch"] == SPEC["ref_batch"]
    assert base["spec"]["warmup"] == "none"
    assert large["baseline_id"] == base["id"] and large["derived"]["total_batch"] == 64
    assert large["group_id"] == base["group_id"] is not None

    spec = RunSpec.model_validate({**SPEC, "seed": 3})
    run = client.submit(spec)
    assert run["spec"]["seed"] == 3 and run["spec"] == spec.model_dump(mode="json")


def test_runs_is_a_dataframe_with_spec_and_derived_columns(client) -> None:
    first = client.submit(SPEC)
    second = client.submit({**SPEC, "workers": 4, "seed": 1})
    client.cancel(first)
    frame = client.runs()
    assert list(frame["id"]) == [second["id"], first["id"]]  # newest first
    row = frame.set_index("id").loc[second["id"]]
    assert (row.workers, row.batch_per_worker, row.total_batch) == (4, 16, 64)
    assert row.peak_lr == pytest.approx(0.4) and row.model == "mlp" and row.seed == 1
    assert str(frame["created_at"].dtype).startswith("datetime64")
    assert list(client.runs(status="cancelled")["id"]) == [first["id"]]
    assert client.runs(status="failed").empty


def test_invalid_spec_raises_validation_error_naming_the_field(client) -> None:
    with pytest.raises(batchlab.ValidationError) as info:
        client.submit({**SPEC, "workers": 64, "batch_per_worker": 64})
    err = info.value
    assert err.status_code == 422
    assert err.errors[0][0] == "batch_per_worker"
    assert str(err).startswith("batch_per_worker: total batch k*n = 64*64 = 4096")

    with pytest.raises(batchlab.ValidationError) as info:
        client.submit({**SPEC, "lr": 0.1})
    [(field, message)] = info.value.errors
    assert field == "lr" and message.startswith("Extra inputs are not permitted")
    with pytest.raises(batchlab.ValidationError, match="did you mean batch_per_worker"):
        client.submit({**SPEC, "batch_per_workr": 32})
    assert client.runs().empty  # nothing stored by a bad request


def test_unknown_ids_raise_not_found(client) -> None:
    with pytest.raises(batchlab.NotFound, match="run 999 not found"):
        client.run(999)
    with pytest.raises(batchlab.NotFound):
        client.cancel(999)
    run = client.submit(SPEC)
    with pytest.raises(batchlab.NotFound, match=r"\[999\]"):
        client.metrics([run, 999])


def test_writes_need_the_token_when_the_server_sets_one(batchlab_home) -> None:
    for server in serve_app(token="s3cret"):
        # One shared httpx client: each batchlab.Client sends its own token (or none).
        with httpx.Client(base_url=server.url) as shared:
            anonymous = batchlab.Client(http=shared)
            with pytest.raises(batchlab.Unauthorized) as info:
                anonymous.submit(SPEC)
            assert info.value.status_code == 401
            assert anonymous.runs().empty  # reads stay open
            wrong = batchlab.Client(http=shared, token="guess")
            with pytest.raises(batchlab.Unauthorized, match="invalid token"):
                wrong.submit(SPEC)
            run = batchlab.Client(http=shared, token="s3cret").submit(SPEC)
            with pytest.raises(batchlab.Unauthorized):
                batchlab.Client(http=shared, token="").cancel(run)
            assert anonymous.run(run)["status"] == "queued"


def test_token_and_url_default_to_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("BATCHLAB_URL", "http://example.invalid:9/")
    monkeypatch.setenv("BATCHLAB_TOKEN", "from-env")
    c = batchlab.Client()
    assert c.url == "http://example.invalid:9" and c.token == "from-env"
    assert batchlab.Client(token="explicit").token == "explicit"


def test_no_server_raises_server_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = batchlab.Client(f"http://127.0.0.1:{port}", timeout=2)
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{port}"):
        c.runs()


def test_sweep_and_its_summary(client) -> None:
    answer = client.sweep(SPEC, batch_sizes=[64, 32], seeds=[0, 1])
    runs = answer["runs"]
    assert sorted(r["derived"]["total_batch"] for r in runs if not r["is_baseline"]) == [
        32, 32, 64, 64
    ]  # fmt: skip
    summary = client.sweep_summary(answer["sweep"]["id"])
    assert len(summary) == len(runs)
    assert list(summary["total_batch"]) == sorted(summary["total_batch"])
    assert set(summary["run_id"]) == {r["id"] for r in runs}
    assert {"peak_lr", "final_val_err", "is_baseline", "seed"} <= set(summary.columns)


def test_schedule_preview(client) -> None:
    plan = client.schedule(SPEC)
    assert plan["warmup_iters"] == 8 and plan["total_iters"] == 16
    assert plan["peak_lr"] == pytest.approx(0.2)  # 0.1 * 32 / 16
    lr = dict(zip(plan["step"], plan["lr"], strict=True))
    assert lr[0] == pytest.approx(0.1)  # gradual warmup starts at base_lr ...
    assert lr[7] == pytest.approx(0.1 + 0.1 * 7 / 8)  # ... and climbs a step each iteration
    assert lr[8] == pytest.approx(0.02)  # the milestone at epoch 1 divides the peak by 10


# --- waiting --------------------------------------------------------------------------------
def test_wait_shows_progress_and_eta_then_times_out(client, server, capsys) -> None:
    from store import runs

    run = client.submit(SPEC)
    _store(server.engine, runs.mark_running, run["id"], host="box", gpus="", worker="w@box")
    _store(server.engine, runs.set_progress, run["id"], 0.5, 75.0)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="still unfinished"):
        client.wait(run, timeout=0.3, poll=0.05)
    assert time.monotonic() - t0 < 3
    err = capsys.readouterr().err
    assert f"run {run['id']}" in err and "50%" in err and "running, eta 1:15" in err


def test_wait_returns_the_final_runs(client, server) -> None:
    from store import runs

    a, b = client.submit(SPEC), client.submit({**SPEC, "seed": 1})

    def worker() -> None:  # what a worker does to the store, in order
        for rid in (a["id"], b["id"]):
            _store(server.engine, runs.mark_running, rid, host="box", gpus="", worker="w")
            _store(server.engine, runs.set_progress, rid, 0.5, 1.0)
            time.sleep(0.1)
        _store(server.engine, runs.mark_finished, a["id"], "succeeded",
               summary={"final_val_err": 0.125})  # fmt: skip
        _store(server.engine, runs.mark_finished, b["id"], "diverged", diverged_step=3)

    thread = threading.Thread(target=worker)
    thread.start()
    final = client.wait([a["id"], b], progress=False, timeout=20, poll=0.05)
    thread.join()
    assert [r["status"] for r in final] == ["succeeded", "diverged"]
    assert final[0]["summary"]["final_val_err"] == 0.125 and final[1]["diverged_step"] == 3
    assert client.wait(a, progress=False)["status"] == "succeeded"  # single in, single out


def test_wait_rides_out_a_server_restart(batchlab_home) -> None:
    from store import runs

    first = serve_app()
    server = next(first)
    client = batchlab.Client(server.url)
    run = client.submit(SPEC)
    result: dict = {}
    waiter = threading.Thread(
        target=lambda: result.update(client.wait(run, progress=False, timeout=30, poll=0.1))
    )
    waiter.start()
    time.sleep(0.3)
    first.close()  # the API goes away while the run trains ...
    _store(server.engine, runs.mark_running, run["id"], host="box", gpus="", worker="w")
    _store(server.engine, runs.mark_finished, run["id"], "succeeded")
    time.sleep(0.5)
    assert waiter.is_alive()  # ... and the wait keeps trying
    for _ in serve_app(port=server.port):  # back on the same address
        waiter.join(timeout=20)
    assert result["status"] == "succeeded"


# --- metrics and figures ------------------------------------------------------------------------
def _write_curve(engine, rid: int, n: int, scale: float) -> list[tuple]:
    from store.metrics import write_points

    points = [
        (step, {"train_err": scale / (step + 1), "lr": 0.01 * (step + 1)}, (step + 1) / 4,
         0.5 * step)
        for step in range(n)
    ]  # fmt: skip
    write_points(engine, rid, points)
    return points


def test_metrics_long_format(client, server) -> None:
    base, large = client.submit(SPEC), client.submit({**SPEC, "workers": 4})
    _write_curve(server.engine, base["id"], 12, 0.9)
    _write_curve(server.engine, large["id"], 8, 0.6)
    frame = client.metrics([base, large["id"]], keys=["train_err", "lr"], max_points=10_000)
    assert list(frame.columns) == ["run", "key", "step", "epoch", "wall_time", "value"]
    assert len(frame) == 2 * 12 + 2 * 8
    err = frame[(frame.run == large["id"]) & (frame.key == "train_err")].sort_values("step")
    assert list(err.step) == list(range(8))
    assert err.value.tolist() == pytest.approx([0.6 / (s + 1) for s in range(8)])
    assert err.epoch.tolist() == pytest.approx([(s + 1) / 4 for s in range(8)])
    assert err.wall_time.tolist() == pytest.approx([0.5 * s for s in range(8)])
    assert frame["run"].dtype == "int64" and frame["step"].dtype == "int64"

    empty = client.metrics(base, keys="val_err")
    assert empty.empty and list(empty.columns) == list(frame.columns)


def test_run_management_tags_notes_archive_export_and_extend(client, server, tmp_path) -> None:
    import pandas as pd

    a, b = client.submit(SPEC), client.submit({**SPEC, "seed": 1})
    out = client.update_run(a, name="renamed", tags=["study"], notes="Warmup helps")
    assert (out["name"], out["tags"], out["notes"]) == ("renamed", ["study"], "Warmup helps")
    client.update_run(b["id"], archived=True)
    frame = client.runs()
    assert list(frame["id"]) == [a["id"]]
    assert frame.iloc[0]["tags"] == ["study"] and not frame.iloc[0]["archived"]
    assert list(client.runs(archived="only")["id"]) == [b["id"]]
    assert list(client.runs(archived="all")["id"]) == [b["id"], a["id"]]
    assert list(client.runs(q="warmup")["id"]) == list(client.runs(tag="study")["id"])
    assert client.runs(tag="none").empty
    with pytest.raises(batchlab.ValidationError, match="tags"):
        client.update_run(a, tags=["x" * 65])

    _write_curve(server.engine, a["id"], 12, 0.9)
    path = client.export([a, b], tmp_path / "points.parquet", format="parquet")
    points = pd.read_parquet(path)
    assert list(points.columns) == ["run_id", "key", "step", "epoch", "wall_time", "value"]
    assert len(points) == 2 * 12 and set(points.run_id) == {a["id"]}
    assert len(pd.read_csv(client.export(a, tmp_path / "a.csv"))) == 2 * 12
    with pytest.raises(ValueError, match="format"):
        client.export(a, tmp_path / "a.xlsx", format="xlsx")
    # A queued run has no checkpoint to continue from: the server says so.
    with pytest.raises(batchlab.APIError, match="queued"):
        client.extend(a, epochs=2)


def test_compare_figure_draws_baseline_black_percent_and_lr_panel(client, server) -> None:
    large, base = client.submit({**SPEC, "workers": 4}, baseline=True)
    _write_curve(server.engine, base["id"], 12, 0.9)
    _write_curve(server.engine, large["id"], 8, 0.6)

    fig = client.compare_figure([large, base])
    top = [t for t in fig.data if t.yaxis in (None, "y")]
    lr = [t for t in fig.data if t.yaxis == "y2"]
    # Baseline first and black, labelled as the paper does; the large run coloured.
    assert top[0].line.color == "#111111" and top[0].name.endswith("· baseline")
    assert top[0].name.startswith("kn=16, η=0.1, no warmup")
    assert top[1].line.color not in ("#111111", "black")
    assert top[1].name.startswith("kn=64, η=0.4, gradual")
    assert list(top[1].y) == pytest.approx([60 / (s + 1) for s in range(8)])  # percent
    assert list(top[1].x) == pytest.approx([(s + 1) / 4 for s in range(8)])  # epochs
    assert list(lr[0].y) == pytest.approx([0.01 * (s + 1) for s in range(12)])
    assert [t.line.color for t in lr] == [t.line.color for t in top]
    # One x axis under both panels, the LR panel beneath the curves.
    assert all(t.xaxis in (None, "x") for t in fig.data) and fig.layout.xaxis.anchor == "y2"
    assert fig.layout.yaxis2.domain[1] < fig.layout.yaxis.domain[0]
    assert fig.layout.yaxis.title.text == "training error (%)"
    assert fig.layout.xaxis.title.text == "epoch"

    smoothed = client.compare_figure([base, large], baseline=base, smoothing=0.5)
    raw, ema_trace = [t for t in smoothed.data if t.yaxis in (None, "y")][:2]
    assert raw.line.color == "rgba(17,17,17,0.22)" and not raw.showlegend
    expected, acc = [], 0.0
    for i, v in enumerate(raw.y, start=1):
        acc = 0.5 * acc + 0.5 * v
        expected.append(acc / (1 - 0.5**i))
    assert list(ema_trace.y) == pytest.approx(expected)

    per_epoch = client.compare_figure([base], key="val_err")  # no points: empty, no LR
    assert per_epoch.data[0].mode == "lines+markers" and len(per_epoch.data[0].x) == 0
    with pytest.raises(ValueError, match="smoothing"):
        client.compare_figure([base], smoothing=1.0)


# --- pure helpers ------------------------------------------------------------------------------
def test_ema_is_debiased_and_skips_gaps() -> None:
    assert ema([2.0, 2.0, 2.0], 0.9) == [2.0, 2.0, 2.0]
    assert ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    out = ema([1.0, math.nan, 3.0], 0.5)
    assert (
        out[0] == 1.0
        and math.isnan(out[1])
        and out[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    )


def test_run_ids_and_spec_inputs(tmp_path) -> None:
    assert run_id(3) == run_id("3") == run_id({"id": 3}) == 3
    with pytest.raises(ValueError, match="not a run id"):
        run_id("three")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping of RunSpec fields"):
        spec_to_dict(bad)
    with pytest.raises(FileNotFoundError):
        spec_to_dict(tmp_path / "missing.yaml")
    with pytest.raises(TypeError):
        spec_to_dict(42)


def test_import_batchlab_is_light() -> None:
    heavy = "('httpx', 'pandas', 'torch', 'plotly')"
    code = f"import sys, batchlab; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the notebook example, end to end ------------------------------------------------------


@pytest.fixture()
def live_server(tmp_path) -> Iterator[str]:
    """`batchlab api` and `batchlab worker --gpus none` on a fresh SQLite home."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLAB_")}
    env.update(BATCHLAB_HOME=str(home), PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}")
    port = free_port()
    argv = {
        "api": ["batchlab", "api", "--host", "127.0.0.1", "--port", str(port)],
        "worker": ["batchlab", "worker", "--gpus", "none"],
    }
    procs = {}
    for name, args in argv.items():
        with (tmp_path / f"{name}.log").open("wb") as log:  # the child keeps its own copy
            procs[name] = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    url = f"http://127.0.0.1:{port}"
    try:
        client = batchlab.Client(url, timeout=5)
        deadline = time.monotonic() + 60
        while True:
            assert procs["api"].poll() is None, (tmp_path / "api.log").read_text()[-3000:]
            try:
                if client.health()["status"] == "ok":
                    break
            except batchlab.APIError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "api.log").read_text()[-3000:]
            time.sleep(0.3)
        yield url
    finally:
        stop_process_groups(list(procs.values()))


@pytest.mark.slow
def test_notebook_example_runs_end_to_end(live_server, tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "notebook.py"), live_server, "--out", str(out),
         "--epochs", "2", "--dataset-size", "500", "--workers", "4", "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout and "wrote" in proc.stdout
    html = (out / "compare.html").read_text()
    # Both runs are drawn (baseline kn=32 and kn=128) over the training error.
    assert "kn=32, " in html and "kn=128, " in html and "training error (%)" in html
    assert len(html) > 1_000_000  # plotly.js is inlined: the file opens offline
    import pandas as pd

    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics.key) == {"train_err", "val_err", "lr"}
    assert metrics.groupby("run").ngroups == 2
    assert (metrics[metrics.key == "val_err"].groupby("run").size() == 2).all()  # 2 epochs
