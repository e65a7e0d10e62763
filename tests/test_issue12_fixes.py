"""Issue 12, "broken or misleading today" 3, 5, 8, 9: API docs offline, milestones past the
end of training, misspelled fields, a quiet `batchlab up`, auth hints, install metadata.

The browser halves (Swagger UI rendering offline, the form's errors and the cancel
confirmation) are in tests/browser/test_docs_offline.py and test_form_errors.py; cancel
latency with a real worker is tests/test_cancel_latency.py.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.errors import format_validation_error
from server.app import create_app
from trainer.spec import RunSpec, paper_milestones

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"model": "mlp", "dataset": "synthetic", "dataset_size": 400, "warmup_epochs": 1}


@pytest.fixture()
def client(sqlite_url, tmp_path):
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


# --- 3: /docs without internet -------------------------------------------------------------
def test_api_docs_load_their_assets_from_this_server(client) -> None:
    for page in ("/docs", "/redoc"):
        html = client.get(page).text
        urls = re.findall(r"""(?:src|href)=["']([^"']+)""", html)
        assert urls, page
        # Every script, stylesheet and icon is ours (FastAPI's default is jsdelivr's CDN).
        assert all(u.startswith("/") and not u.startswith("//") for u in urls), (page, urls)
        assert "cdn" not in html.lower() and "fonts.googleapis" not in html
        for url in urls:
            r = client.get(url)
            assert r.status_code == 200 and len(r.content) > 1000, url
    js = client.get("/static/vendor/apidocs/swagger-ui-bundle.js")
    assert js.headers["content-type"].startswith("text/javascript")
    assert "max-age=86400" in js.headers["cache-control"]
    again = client.get(
        "/static/vendor/apidocs/swagger-ui-bundle.js", headers={"If-None-Match": js.headers["etag"]}
    )
    assert again.status_code == 304
    assert client.get("/static/vendor/apidocs/core.py").status_code == 404
    assert client.get("/static/vendor/apidocs/.hidden").status_code == 404


# --- 5: milestones at or past the end of training ------------------------------------------
def test_milestones_past_the_end_are_refused_naming_milestones() -> None:
    with pytest.raises(ValidationError) as err:
        RunSpec(epochs=10, milestones=[10, 20, 27])
    (error,) = err.value.errors()
    assert error["loc"] == ("milestones",)
    assert "[10, 20, 27]" in error["msg"] and "epochs=10" in error["msg"]
    # Milestones only matter for step decay; inside training they are fine.
    assert RunSpec(epochs=10, milestones=[10, 20], decay="cosine").milestones == [10, 20]
    assert RunSpec(epochs=10, milestones=[3, 9.5]).milestones == [3, 9.5]


def test_default_milestones_follow_epochs() -> None:
    """Left out, milestones are the paper's 30, 60, 80 of 90 epochs scaled to `epochs`,
    so `--set epochs=N` on a spec without milestones still decays."""
    assert RunSpec().milestones == paper_milestones(20) == [6.67, 13.33, 17.78]
    assert RunSpec(epochs=2, warmup_epochs=1).milestones == [0.67, 1.33, 1.78]
    assert RunSpec(epochs=90).milestones == [30, 60, 80]
    assert RunSpec.model_validate({"epochs": "9"}).milestones == [3, 6, 8]
    # What the form shows as its default is RunSpec's (tests/browser/test_newrun.py).
    spec_fields = (ROOT / "frontend" / "js" / "spec_fields.js").read_text()
    assert "default: [6.67, 13.33, 17.78]" in spec_fields


def test_api_refuses_late_milestones_and_suggests_field_names(client) -> None:
    spec = {**SMALL, "epochs": 10, "milestones": [10, 20, 27]}
    r = client.post("/api/plan/run", json={"spec": spec})
    assert r.status_code == 422
    (item,) = r.json()["detail"]
    assert item["field"] == "milestones" and "past the end of training" in item["message"]

    r = client.post("/api/runs", json={"spec": {**SMALL, "epochs": 2, "batch_per_workr": 8}})
    assert r.status_code == 422
    (item,) = r.json()["detail"]
    assert item["field"] == "batch_per_workr"
    assert "did you mean batch_per_worker?" in item["message"]


def test_unknown_fields_get_the_closest_name() -> None:
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate({"warmup_epoch": 2, "learnin_rate": 1, "zzz": 0})
    text = format_validation_error(err.value)
    assert "warmup_epoch: Extra inputs are not permitted (unknown field): did you mean " in text
    assert "did you mean warmup_epochs?" in text
    assert "zzz: Extra inputs are not permitted (unknown field): docs/runspec.md" in text


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchlab.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_names_milestones_and_misspelled_fields(tmp_path) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text("model: mlp\ndataset: synthetic\ndataset_size: 400\nmilestones: [10, 20, 27]\n")
    out = _cli("train", str(spec), "--set", "epochs=10", "--out", str(tmp_path / "o"), cwd=ROOT)
    assert out.returncode == 2
    assert "milestones: milestones [10, 20, 27] are at or past the end of training" in out.stderr
    out = _cli("train", str(spec), "--set", "batch_per_workr=8", "--out", str(tmp_path), cwd=ROOT)
    assert out.returncode == 2 and "did you mean batch_per_worker?" in out.stderr
    spec.write_text("model: mlp\ndataset: synthetic\nepoch: 3\n")
    out = _cli("train", str(spec), "--out", str(tmp_path / "o"), cwd=ROOT)
    assert out.returncode == 2 and "epoch: " in out.stderr and "did you mean epochs?" in out.stderr


# --- 8: make demo PORT=, a quiet `batchlab up`, install metadata ----------------------------
def test_make_demo_passes_port_host_and_args() -> None:
    out = subprocess.run(
        ["make", "-n", "demo", "PORT=8001", "HOST=0.0.0.0", "ARGS=-v"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "batchlab up --demo --host 0.0.0.0 --port 8001 -v" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(home: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    env = {"PATH": str(Path(sys.executable).parent), "BATCHLAB_HOME": str(home)}
    return subprocess.Popen(
        [sys.executable, "-m", "batchlab.cli", "up", "--no-worker", "--port", str(port), *extra],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _requests_then_stop(proc: subprocess.Popen[str], port: int) -> str:
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "batchlab up did not start"
        time.sleep(0.2)
    for path in ("/", "/api/runs", "/api/runs?limit=5", "/docs"):
        httpx.get(url + path, timeout=10)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    return out


@pytest.mark.slow
def test_batchlab_up_is_quiet_unless_verbose(tmp_path) -> None:
    port = _free_port()
    out = _requests_then_stop(_up(tmp_path, port), port)
    assert f"batchlab is up: http://127.0.0.1:{port}" in out
    assert not re.search(r'"GET /\S* HTTP/1\.1" \d{3}', out), out
    port = _free_port()
    out = _requests_then_stop(_up(tmp_path, port, "--verbose"), port)
    assert re.search(r'"GET /api/runs\?limit=5 HTTP/1\.1" 200', out), out


def test_port_in_use_suggests_the_flag_and_make() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = _cli("up", "--no-worker", "--port", str(port), cwd=ROOT)
    assert out.returncode == 1
    assert f"--port {port + 1}" in out.stderr and f"make demo PORT={port + 1}" in out.stderr


def test_project_accepts_python_3_12_and_3_13_and_has_no_license_table() -> None:
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = SpecifierSet(project["requires-python"])
    assert {"3.11.7", "3.12.1", "3.13.0"} <= set(allowed.filter(["3.11.7", "3.12.1", "3.13.0"]))
    assert project["license"] == "MIT"  # SPDX: setuptools warns about the table form
    pins = (ROOT / "constraints.txt").read_text().lower().replace("_", "-")
    assert "fastapi-offline==" in pins


# --- 9: auth errors say how to pass the token -----------------------------------------------
def test_401_says_how_to_pass_the_token(sqlite_url, tmp_path) -> None:
    app = create_app(
        database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}", token="t0k"
    )
    with TestClient(app) as c:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = c.post("/api/runs/1/cancel", headers=headers)
            assert r.status_code == 401
            detail = r.json()["detail"]
            for hint in ("--token", "BATCHLAB_TOKEN", "Client(token=...)"):
                assert hint in detail, (hint, detail)
    app.state.ctx.engine.dispose()


def test_client_unauthorized_names_the_ways_to_pass_a_token() -> None:
    from batchlab.client import _error_from

    bare = httpx.Response(401, json={"detail": "invalid token"})
    err = _error_from(bare)
    assert "Client(token=...)" in str(err) and "BATCHLAB_TOKEN" in str(err)


# --- 4: README examples that fit a laptop, full-size presets kept -----------------------------
LAPTOP_SAMPLES = 100_000  # samples trained per run: ~2 min of a 2-core CPU at kn = 32


@pytest.mark.parametrize("name", ["baseline", "large_gradual", "sweep_base"])
def test_example_specs_fit_a_laptop_and_full_presets_are_kept(name: str) -> None:
    import yaml

    small = RunSpec.model_validate(
        yaml.safe_load((ROOT / f"examples/specs/{name}.yaml").read_text())
    )
    full = RunSpec.model_validate(
        yaml.safe_load((ROOT / f"examples/specs/full/{name}.yaml").read_text())
    )
    assert small.train_size is not None and small.epochs * small.train_size <= LAPTOP_SAMPLES
    assert full.epochs == 30 and full.train_size == 16384
    # The same experiment, only smaller.
    same = {"model", "workers", "batch_per_worker", "base_lr", "warmup", "norm", "ref_batch"}
    assert {k: getattr(small, k) for k in same} == {k: getattr(full, k) for k in same}


def test_readme_examples_say_how_long_they_take() -> None:
    readme = (ROOT / "README.md").read_text()
    lines = [
        line
        for line in readme.splitlines()
        if re.search(r"(batchlab (train|submit)|c\.(submit|sweep))\(?.*examples/specs/", line)
    ]
    assert len(lines) >= 4
    for line in lines:
        # The time is on the line or in the comment right above it.
        above = readme.splitlines()[readme.splitlines().index(line) - 1]
        assert re.search(r"~\d+ (s|min)", line + above), line
    assert "examples/specs/full/" in readme
