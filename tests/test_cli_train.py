"""``batchlab train``: a tiny run end to end, bad input, resume and start over."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from batchlab.cli import main
from trainer.sink import read_jsonl
from trainer.spec import RunSpec

SPEC = {
    "model": "mlp",
    "dataset": "synthetic",
    "dataset_size": 200,
    "epochs": 2,
    "workers": 4,
    "batch_per_worker": 8,
    "ref_batch": 8,
    "base_lr": 0.05,
    "warmup_epochs": 1,
    "milestones": [1.5],
    "device": "cpu",
    "target_accuracy": 0.2,
}


pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


@pytest.fixture()
def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_train_writes_metrics_summary_checkpoint_and_prints_a_summary(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", str(spec_file), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "succeeded: 10 iterations" in captured.out
    assert "val err: final" in captured.out and "target accuracy 20.00%:" in captured.out
    assert "10/10" in captured.err  # the tqdm bar reached the end

    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(10))
    assert len([r for r in rows if "val_err" in r]) == 2
    meta = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["total_batch"] == 32 and meta["iters_per_epoch"] == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["iterations"] == 10
    assert summary["summary"]["final_val_err"] == [r for r in rows if "val_err" in r][-1]["val_err"]
    assert RunSpec.model_validate(yaml.safe_load((out / "spec.yaml").read_text())) == RunSpec(
        **SPEC
    )
    assert (out / "checkpoint.pt").exists()


def test_invalid_spec_prints_each_field_and_exits_2(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bad"
    code = main(
        [
            "train", str(spec_file), "--out", str(out), "--no-progress",
            "--set", "batch_per_worker=1000", "--set", "learning_rate=3",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert "batch_per_worker: total batch" in err and "larger than the training set" in err
    assert "learning_rate: Extra inputs are not permitted" in err
    assert not out.exists()  # nothing written for a refused spec

    assert main(["train", str(spec_file), "--out", str(out), "--set", "workers"]) == 2
    assert "expected FIELD=VALUE" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_set_values_are_read_as_yaml(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(spec_file), "--out", str(out), "--no-progress"]
    assert main([*args, "--set", "milestones=[1.2]", "--set", "epochs=3"]) == 0
    saved = yaml.safe_load((out / "spec.yaml").read_text())
    assert saved["milestones"] == [1.2] and saved["epochs"] == 3


def test_rerun_resumes_and_no_resume_starts_over(
    spec_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", str(spec_file), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    first = (out / "metrics.jsonl").read_text()
    # The checkpoint is of the last epoch: resuming finds nothing left to train.
    assert main(args) == 0
    assert (out / "metrics.jsonl").read_text().startswith(first)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r] == list(range(10))
    # A different spec on the same folder is refused, naming the field.
    capsys.readouterr()
    assert main([*args, "--set", "base_lr=0.2"]) == 2
    assert "base_lr: 0.05 -> 0.2" in capsys.readouterr().err
    # --no-resume replaces the run.
    assert main([*args, "--no-resume", "--set", "base_lr=0.2"]) == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == list(range(10))
    assert rows[0]["lr"] == 0.2


def test_diverged_run_exits_1(spec_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["train", str(spec_file), "--out", str(out), "--no-progress"]
    code = main([*args, "--set", "base_lr=1000", "--set", "ref_batch=32", "--set", "warmup=none"])
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_step"] is not None


def test_cmd_train_does_not_import_torch() -> None:
    code = (
        "import sys, argparse, batchlab.cmd_train as m\n"
        "m.add_arguments(argparse.ArgumentParser())\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize("layout", ["missing", "wrong_format"])
def test_data_problems_exit_2_with_one_line(
    layout: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cifar"
    if layout == "wrong_format":  # the files are there, but they are not CIFAR-10 pickles
        (root / "cifar-10-batches-py").mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (root / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    spec = {**SPEC, "model": "mlp", "dataset": "cifar10", "data_root": str(root),
            "dataset_size": 100}  # fmt: skip
    path = tmp_path / "cifar.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "data_root" in lines[0] and "Traceback" not in err, err
