"""GET /api/metrics' trimmed answer for plots (columns, digits, drop_flat): the compare
view's first read (issue 12). The trimmed series draw the same lines as the full ones."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from store import db, metrics, runs

LR_STEPS = {0: 0.1, 300: 0.01, 600: 0.001}  # a step schedule: corners at 300 and 600
N = 1000


@pytest.fixture()
def client(batchlab_home, sqlite_url, tmp_path) -> Iterator[TestClient]:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    with TestClient(app) as c:
        yield c
    app.state.ctx.engine.dispose()


def seed(client: TestClient) -> int:
    engine = client.app.state.ctx.engine
    with db.session(engine) as s:
        run_id = runs.create_run(s, name="compact", spec={"model": "mlp"}).id
    rng = np.random.default_rng(0)
    points = []
    for i in range(N):
        lr = LR_STEPS[max(k for k in LR_STEPS if k <= i)]
        err = math.nan if i == 500 else 0.3 + 0.5 * math.exp(-i / 200) + 0.01 * rng.random()
        points.append((i, {"train_err": err, "lr": lr}, (i + 1) / 100, 0.05 * i))
    metrics.write_points(engine, run_id, points)
    return run_id


def get(client: TestClient, query: str) -> dict[str, Any]:
    r = client.get(f"/api/metrics?{query}")
    assert r.status_code == 200, r.text
    return json.loads(r.text)


def test_trimmed_answer_draws_the_same_lines(client) -> None:
    run_id = seed(client)
    base = f"runs={run_id}&keys=train_err,lr&x=epoch&max_points=1500"
    full = get(client, base)["runs"][str(run_id)]
    trimmed = get(client, base + "&columns=epoch,value&digits=6&drop_flat=lr")["runs"][str(run_id)]

    for key in ("train_err", "lr"):
        assert set(trimmed[key]) == {"epoch", "value", "total"}
        assert trimmed[key]["total"] == full[key]["total"] == N
        # The documented response model accepts the trimmed shape (OpenAPI matches).
        from server.schemas import Series

        Series.model_validate(trimmed[key], strict=True)
    # Floats rounded to 6 significant digits, no point left out, the NaN still null.
    err, ref = trimmed["train_err"], full["train_err"]
    assert len(err["value"]) == len(ref["value"]) == N
    assert err["value"][500] is None and ref["value"][500] is None
    for got, want in zip(err["value"] + err["epoch"], ref["value"] + ref["epoch"], strict=True):
        if want is not None:
            assert got == float(f"{want:.6g}")
    # The step schedule keeps its ends and corners only, and interpolating them gives
    # every point of the full series: the same line.
    lr = trimmed["lr"]
    assert lr["value"] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    assert lr["epoch"] == [0.01, 3.0, 3.01, 6.0, 6.01, 10.0]
    line = np.interp(full["lr"]["epoch"], lr["epoch"], lr["value"])
    assert line == pytest.approx(full["lr"]["value"], rel=1e-12)
    # Keys not named in drop_flat keep their points: markers and EMAs need each one.
    kept = get(client, base + "&columns=epoch,value")["runs"][str(run_id)]["lr"]
    assert len(kept["value"]) == N and kept["value"] == full["lr"]["value"]
    # The trimmed answer is what the compare view asks for: a fraction of the JSON.
    raw = client.get(f"/api/metrics?{base}").content
    small = client.get(f"/api/metrics?{base}&columns=epoch,value&digits=6&drop_flat=lr").content
    assert len(small) < len(raw) / 3


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("columns=epoch,bogus", "columns"),
        ("digits=0", "digits"),
        ("digits=18", "digits"),
        ("drop_flat=lr;drop", "drop_flat"),
    ],
)
def test_bad_trim_options_name_the_field(client, query, field) -> None:
    r = client.get(f"/api/metrics?runs=1&keys=lr&{query}")
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["loc"] == ["query", field]
