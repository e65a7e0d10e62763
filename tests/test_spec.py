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
    # The paper's 30, 60, 80 of 90 epochs, scaled to the default 20.
    assert spec.milestones == [6.67, 13.33, 17.78] and spec.epochs == 20
    assert RunSpec(epochs=90).milestones == [30.0, 60.0, 80.0]


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


def test_precision_refuses_fp16_with_the_reason_and_compile_is_opt_in() -> None:
    [(field, msg)] = _error_fields(precision="fp16")
    assert field == "precision" and "GradScaler" in msg and "bf16" in msg
    [(field, _)] = _error_fields(precision="fp64")
    assert field == "precision"
    assert RunSpec().compile is False and RunSpec().precision == "fp32"
    assert RunSpec(compile=True, precision="bf16").compile is True
    [(field, _)] = _error_fields(compile="sometimes")
    assert field == "compile"


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
        "update_batch": 8192,
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


@pytest.mark.parametrize("name", ["baseline", "large_gradual", "sweep_base"])
def test_example_specs_use_every_sample_at_every_swept_batch(name: str) -> None:
    """A sweep of kn = 32 ... 8192 over the presets never drops part of an epoch."""
    path = Path(__file__).resolve().parents[1] / "examples" / "specs" / f"{name}.yaml"
    spec = RunSpec.model_validate(yaml.safe_load(path.read_text()))
    assert spec.train_size is not None
    for kn in (32 * 2**i for i in range(9)):
        assert spec.train_size % kn == 0, (kn, spec.train_size)
        assert spec.with_total_batch(kn).train_size == spec.train_size


# --- resource limits (docs/runspec.md, "Limits") -------------------------------------------
@pytest.mark.parametrize(
    ("update", "field"),
    [
        ({"dataset_size": 2**62}, "dataset_size"),
        ({"dataset": "mnist1d", "dataset_size": 5_000_000}, "dataset_size"),
        (
            {"model": "resnet50", "dataset": "synthetic", "dataset_size": 1_000_000},
            "dataset_size",
        ),
        ({"milestones": [float(i) for i in range(1, 30_001)]}, "milestones"),
        ({"milestones": [1e300]}, "milestones"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 2**63}, "seed"),
        ({"eval_every": 10**9}, "eval_every"),
        ({"micro_batch": 10**9}, "micro_batch"),
        ({"ref_batch": 2**40}, "ref_batch"),
        ({"warmup": "none", "warmup_epochs": 1e300}, "warmup_epochs"),
        ({"ghost_batch": 10**9}, "ghost_batch"),
        ({"base_lr": float("nan")}, "base_lr"),
        ({"divergence_factor": float("inf")}, "divergence_factor"),
        ({"milestones": [10.0, float("inf")]}, "milestones"),
        ({"model": "mlp", "dataset": "mnist", "data_root": "/data\x00/mnist"}, "data_root"),
        ({"model": "mlp", "dataset": "mnist", "data_root": "/data/\ud800"}, "data_root"),
    ],
)
def test_values_past_the_limits_are_refused_naming_the_field(update, field) -> None:
    with pytest.raises(ValidationError) as err:
        RunSpec.model_validate(update)
    assert [e["loc"][0] for e in err.value.errors()] == [field]


def test_values_at_the_limits_are_accepted() -> None:
    spec = RunSpec.model_validate(
        {
            "dataset": "mnist1d",
            "dataset_size": 1_000_000,
            "seed": 2**32 - 1,
            "epochs": 101,
            "milestones": [float(i) for i in range(1, 101)],
            "eval_every": 10_000,
            "micro_batch": 65_536,
            "ref_batch": 2**20,
        }
    )
    assert spec.seed == 2**32 - 1 and len(spec.milestones) == 100


def test_docs_runspec_lists_the_limits() -> None:
    from trainer import spec as spec_module

    text = (Path(__file__).resolve().parents[1] / "docs" / "runspec.md").read_text(encoding="utf-8")
    for name in ("MAX_DATASET_SIZE", "MAX_MNIST1D_SIZE", "MAX_MILESTONES", "MAX_SEED"):
        assert f"{getattr(spec_module, name):_}" in text.replace(",", "_"), name
