"""RunSpec: errors name the field a user must change; derived figures follow the paper."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from trainer.spec import RunSpec, input_shape, load_spec


def _error_fields(**fields: object) -> list[tuple[str, str]]:
    """(field, message) of every error RunSpec raises for ``fields``."""
    with pytest.raises(ValidationError) as info:
        RunSpec(**fields)
    return [(str(e["loc"][-1]), e["msg"]) for e in info.value.errors()]


def test_defaults_validate_and_describe_the_paper_setting() -> None:
    spec = RunSpec()
    assert spec.total_batch == spec.workers * spec.batch_per_worker
    assert spec.warmup == "gradual" and spec.weight_decay == 1e-4
    assert spec.milestones == [30.0, 60.0, 80.0]


def test_batch_larger_than_training_set_names_batch_per_worker() -> None:
    errors = _error_fields(dataset="synthetic", dataset_size=100, workers=4, batch_per_worker=32)
    assert errors[0][0] == "batch_per_worker"
    assert "larger than the training set" in errors[0][1] and "80 samples" in errors[0][1]


def test_warmup_longer_than_training_names_warmup_epochs() -> None:
    errors = _error_fields(epochs=3, warmup="gradual", warmup_epochs=5)
    assert errors == [("warmup_epochs", errors[0][1])]
    assert "longer than training" in errors[0][1]
    # Without warmup the length is irrelevant.
    RunSpec(epochs=3, warmup="none", warmup_epochs=5)


def test_unknown_model_names_model() -> None:
    errors = _error_fields(model="vgg16")
    assert errors[0][0] == "model"


def test_bn_ghost_without_ghost_batch_names_ghost_batch() -> None:
    errors = _error_fields(norm="bn_ghost")
    assert errors == [("ghost_batch", errors[0][1])]
    assert "needs ghost_batch" in errors[0][1]
    errors = _error_fields(norm="bn_ghost", batch_per_worker=32, ghost_batch=12)
    assert errors[0][0] == "ghost_batch" and "must divide" in errors[0][1]


def test_extra_field_is_refused_by_name() -> None:
    with pytest.raises(ValidationError) as info:
        RunSpec(learning_rate=0.1)
    (err,) = info.value.errors()
    assert err["loc"] == ("learning_rate",) and err["type"] == "extra_forbidden"


def test_cross_field_rules_name_the_later_field() -> None:
    assert _error_fields(workers=6, nproc=4)[0][0] == "nproc"
    assert _error_fields(batch_per_worker=32, micro_batch=12)[0][0] == "micro_batch"
    assert _error_fields(model="resnet20", dataset="mnist1d")[0][0] == "dataset"
    assert _error_fields(milestones=[60, 30])[0][0] == "milestones"
    assert _error_fields(model="resnet20", dataset="cifar10")[0][0] == "data_root"


def test_spec_is_frozen() -> None:
    spec = RunSpec()
    with pytest.raises(ValidationError):
        spec.workers = 8  # type: ignore[misc]


def test_derived_figures_for_the_paper_8k_run() -> None:
    spec = RunSpec(
        dataset="synthetic", dataset_size=500_000, workers=256, batch_per_worker=32, epochs=90
    )
    assert spec.total_batch == 8192
    assert spec.peak_lr == pytest.approx(3.2)  # 0.1 * 8192 / 256, sec. 5.1
    assert spec.train_size == 400_000
    assert spec.iters_per_epoch == 400_000 // 8192
    assert spec.total_iters == 90 * (400_000 // 8192)
    assert spec.summary_dict() == {
        "total_batch": 8192,
        "peak_lr": spec.peak_lr,
        "iters_per_epoch": spec.iters_per_epoch,
        "total_iters": spec.total_iters,
    }


def test_train_size_follows_each_dataset_split() -> None:
    assert RunSpec(dataset="mnist1d").train_size == 4000  # 80% of 5000
    assert RunSpec(dataset="mnist1d", dataset_size=500).train_size == 400
    assert RunSpec(dataset="synthetic", dataset_size=1000).train_size == 800


def test_sqrt_and_no_scaling_rules() -> None:
    kw = {"dataset": "synthetic", "dataset_size": 20_000, "workers": 32, "batch_per_worker": 32}
    assert RunSpec(**kw, scaling="sqrt").peak_lr == pytest.approx(0.1 * 2.0)  # sqrt(1024/256)
    assert RunSpec(**kw, scaling="none").peak_lr == 0.1
    assert RunSpec(**kw, scaling="linear").peak_lr == pytest.approx(0.4)


def test_baseline_keeps_n_and_uses_ref_batch() -> None:
    spec = RunSpec(dataset="synthetic", dataset_size=20_000, workers=32, batch_per_worker=32)
    base = spec.baseline()
    assert (base.workers, base.batch_per_worker, base.warmup) == (8, 32, "none")
    assert base.total_batch == 256 and base.peak_lr == pytest.approx(0.1)
    odd = RunSpec(dataset="synthetic", dataset_size=20_000, workers=2, batch_per_worker=48)
    assert (odd.baseline().workers, odd.baseline().batch_per_worker) == (1, 256)


def test_with_total_batch_keeps_n_per_worker() -> None:
    spec = RunSpec(dataset="synthetic", dataset_size=20_000, workers=8, batch_per_worker=32)
    big = spec.with_total_batch(1024)
    assert (big.workers, big.batch_per_worker) == (32, 32)
    with pytest.raises(ValidationError):
        spec.with_total_batch(100_000)  # larger than the training set


def test_input_shape_and_load_spec(tmp_path) -> None:
    assert input_shape(RunSpec(model="mlp", dataset="synthetic")) == (40,)
    assert input_shape(RunSpec(model="simple_cnn", dataset="synthetic")) == (1, 28, 28)
    path = tmp_path / "spec.yaml"
    path.write_text("model: mlp\ndataset: synthetic\nworkers: 2\n")
    assert load_spec(str(path)) == RunSpec(model="mlp", dataset="synthetic", workers=2)


def test_spec_and_trainer_package_do_not_import_torch() -> None:
    code = (
        "import sys, trainer, trainer.spec, trainer.schedule, trainer.sink, trainer.metrics\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "trainer.RunConfigError\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_docs_runspec_lists_every_field_with_its_default() -> None:
    doc = (Path(__file__).resolve().parents[1] / "docs" / "runspec.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", doc, flags=re.MULTILINE))
    assert set(rows) == set(RunSpec.model_fields)
    for name, field in RunSpec.model_fields.items():
        documented = yaml.safe_load(rows[name])
        if isinstance(documented, str) and documented[:1].isdigit():
            documented = float(documented)  # YAML 1.1 reads 1e-4 as a string
        assert documented == field.get_default(call_default_factory=True), name
