"""Small rules written once: validation wording, spec files with --set, summary keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.errors import error_field, field_errors, format_validation_error
from server.app import create_app
from server.schemas import SummaryRow
from trainer.metrics import SUMMARY_KEYS
from trainer.spec import RunSpec
from trainer.specfile import SpecFileError, parse_override, read_spec

ROOT = Path(__file__).resolve().parent.parent


# --- "field: message" ----------------------------------------------------------------------
def test_error_field_names() -> None:
    assert error_field(["body", "spec", "batch_per_worker"]) == "batch_per_worker"
    assert error_field(["body", "batch_sizes", 1]) == "batch_sizes[1]"
    assert error_field(("query", "keys")) == "keys"
    assert error_field(("milestones", 0)) == "milestones[0]"
    assert error_field(["body"]) == error_field(()) == ""


def test_format_validation_error_from_pydantic_and_from_json() -> None:
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate({"workers": 4096, "learning_rate": 3})
    pairs = field_errors(info.value)
    assert [f for f, _ in pairs] == ["batch_per_worker", "learning_rate"]
    assert not any(m.startswith("Value error, ") for _, m in pairs)
    text = format_validation_error(info.value)
    assert "; learning_rate: Extra inputs are not permitted" in text
    # FastAPI's 422 detail (JSON), a plain string, and a model-level error without a field
    detail = [{"loc": ["body", "spec"], "msg": "Value error, bad spec"}]
    assert format_validation_error(detail) == "spec: bad spec"
    assert format_validation_error("nope") == "nope"
    assert format_validation_error([{"loc": [], "msg": "whole"}], "\n") == "whole"


def test_api_422_carries_field_and_message(sqlite_url, tmp_path) -> None:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    spec = {"model": "mlp", "dataset_size": 4000, "epochs": 2, "warmup_epochs": 1}
    with TestClient(app) as client:
        r = client.post("/api/sweeps", json={"spec": spec, "batch_sizes": [64, 0]})
        assert r.status_code == 422
        item = r.json()["detail"][0]
        assert item["loc"] == ["body", "batch_sizes", 1] and item["field"] == "batch_sizes[1]"
        r = client.post("/api/runs", json={"spec": {**spec, "workers": 4096}})
        item = r.json()["detail"][0]
        assert item["field"] == "batch_per_worker"
        assert item["msg"].startswith("Value error, ")  # FastAPI's own keys are unchanged
        assert item["message"] == item["msg"].removeprefix("Value error, ")
        r = client.get("/api/runs/1/stream?since=x:y")
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "since"
    app.state.ctx.engine.dispose()


# --- spec files and --set ------------------------------------------------------------------
def test_read_spec_with_overrides(tmp_path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text("model: mlp\nworkers: 2\n")
    data = read_spec(path, ["workers=32", "milestones=[30, 60]", "target_accuracy="])
    assert data == {"model": "mlp", "workers": 32, "milestones": [30, 60], "target_accuracy": None}
    assert parse_override(" seed = 3") == ("seed", 3)


@pytest.mark.parametrize(
    ("content", "override", "message"),
    [
        ("- a list\n", None, "mapping of RunSpec fields"),
        ("model: [mlp\n", None, "is not valid YAML"),
        ("model: mlp\n", "workers", "expected FIELD=VALUE, got 'workers'"),
        ("model: mlp\n", "=3", "expected FIELD=VALUE"),
        ("model: mlp\n", "milestones=[30", "--set milestones: '[30' is not valid YAML"),
    ],
)
def test_read_spec_errors_name_the_problem(tmp_path, content, override, message) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(content)
    with pytest.raises(SpecFileError, match=re.escape(message)):
        read_spec(path, [override] if override else [])
    with pytest.raises(FileNotFoundError, match="spec file not found"):
        read_spec(tmp_path / "missing.yaml")


# --- summary keys: trainer.metrics.SUMMARY_KEYS is the list -------------------------------
ROW_FIELDS = {"run_id", "total_batch", "workers", "batch_per_worker", "seed", "peak_lr",
              "status", "is_baseline"}  # fmt: skip


def test_summary_copies_use_the_trainers_keys() -> None:
    assert set(SummaryRow.model_fields) - ROW_FIELDS <= set(SUMMARY_KEYS)
    # run.js: the summary panel, from `const s = r.summary` to the end of its list
    run_js = (ROOT / "frontend/js/run.js").read_text().split("const s = r.summary", 1)[1]
    run_js = run_js.split("].filter", 1)[0]
    sweep_js = (ROOT / "frontend/js/sweep.js").read_text()
    cmd_train = (ROOT / "batchlab/cmd_train.py").read_text()
    read = {
        "run.js": set(re.findall(r"\bs\.(\w+)", run_js)),
        # the table's cells and the error plot's choices
        "sweep.js": set(re.findall(r"cell\(g\.rows\.map\(\(r\) => r\.(\w+)\)", sweep_js))
        | set(re.findall(r"\['(\w+_val_err)'", sweep_js)),
        "cmd_train.py": set(re.findall(r"\bs\['(\w+)'\]", cmd_train)),
    }
    for where, keys in read.items():
        assert keys and keys <= set(SUMMARY_KEYS), (where, keys - set(SUMMARY_KEYS))
