"""trainer.plan: which runs a request creates, the same for the API, its preview and the demo."""

from __future__ import annotations

import json
import subprocess
import sys

from trainer.plan import plan_compare, plan_run, plan_sweep
from trainer.spec import RunSpec

# 3200 MNIST-1D training samples; kn = ref_batch = 32 is the baseline.
SPEC = RunSpec(
    model="mlp",
    dataset_size=4000,
    epochs=4,
    warmup_epochs=1,
    batch_per_worker=32,
    workers=4,
    ref_batch=32,
    base_lr=0.05,
)


def test_plan_run_alone_and_with_its_baseline() -> None:
    alone = plan_run(SPEC)
    assert [(r.name, r.is_baseline, r.baseline_index) for r in alone.runs] == [
        ("kn=128 k=4 n=32 gradual", False, None)
    ]
    assert alone.group is None and alone.errors == [] and alone.warnings == []

    paired = plan_run(SPEC, name=" big ", baseline=True)
    base, run = paired.runs
    assert base.spec == SPEC.baseline() and base.is_baseline
    assert (base.spec.total_batch, base.spec.warmup) == (32, "none")
    assert base.name == "baseline kn=32 k=1 n=32 none"
    assert (run.spec, run.name, run.is_baseline, run.baseline_index) == (SPEC, "big", False, 0)
    assert paired.group is not None
    assert (paired.group.name, paired.group.kind) == ("big vs baseline", "compare")


def test_run_at_ref_batch_is_its_own_baseline() -> None:
    spec = SPEC.model_copy(update={"workers": 1})
    plan = plan_run(spec, baseline=True)
    assert [(r.is_baseline, r.baseline_index) for r in plan.runs] == [(True, None)]
    assert plan.group is None
    assert plan.warnings == ["kn = ref_batch: this run is its own baseline"]


def test_sweep_pairs_each_seed_with_its_baseline() -> None:
    plan = plan_sweep(SPEC, [64, 128], seeds=[0, 1])
    got = [(r.spec.total_batch, r.spec.seed, r.is_baseline, r.baseline_index) for r in plan.runs]
    assert got == [
        (32, 0, True, None),
        (32, 1, True, None),
        (64, 0, False, 0),
        (64, 1, False, 1),
        (128, 0, False, 0),
        (128, 1, False, 1),
    ]
    assert plan.runs[2].name == "kn=64 k=2 n=32 gradual seed=0"
    assert plan.runs[0].spec.warmup == "none"
    assert plan.group is not None
    assert plan.group.name == "sweep kn=64,128 mlp gradual"
    assert (plan.group.kind, plan.group.batch_sizes, plan.group.seeds) == (
        "sweep",
        [64, 128],
        [0, 1],
    )

    # The reference size in the list is the baseline itself; without seeds, spec.seed.
    own = plan_sweep(SPEC, [32, 256], name="mine")
    assert [(r.spec.total_batch, r.is_baseline, r.baseline_index) for r in own.runs] == [
        (32, True, None),
        (256, False, 0),
    ]
    assert own.group is not None and (own.group.name, own.group.seeds) == ("mine", [0])
    unpaired = plan_sweep(SPEC, [64], baseline=False)
    assert [(r.is_baseline, r.baseline_index) for r in unpaired.runs] == [(False, None)]


def test_sweep_lists_sizes_that_cannot_run_and_plans_the_others() -> None:
    plan = plan_sweep(SPEC, [64, 8192, 128])
    assert [r.spec.total_batch for r in plan.runs] == [32, 64, 128]
    (error,) = plan.errors
    assert (error.index, error.total) == (1, 8192)
    assert error.message.startswith("batch size 8192 gives an invalid spec: batch_per_worker: ")
    assert "larger than the training set" in error.message


def test_compare_puts_the_reference_first() -> None:
    big = SPEC.model_copy(update={"workers": 16})
    ref = SPEC.model_copy(update={"workers": 1})
    plan = plan_compare([("big", big), ("ref", ref)], name="demo")
    assert [(r.name, r.is_baseline, r.baseline_index) for r in plan.runs] == [
        ("ref", True, None),
        ("big", False, 0),
    ]
    assert plan.group is not None and (plan.group.name, plan.group.kind) == ("demo", "compare")
    without = plan_compare([("big", big), ("mid", SPEC)], name="x")
    assert [r.baseline_index for r in without.runs] == [None, None]


def test_warning_when_a_size_drops_much_of_each_epoch() -> None:
    # 3200 samples: kn=1024 trains on 3072 (96%), kn=2048 on 2048 (64%).
    plan = plan_sweep(SPEC, [1024, 2048], baseline=False)
    assert plan.warnings == [
        "kn=2048 uses 2048 of 3200 training samples per epoch (64%): "
        "the last partial minibatch is dropped"
    ]


def test_planning_does_not_import_torch() -> None:
    code = "import sys, json, trainer.plan; print(json.dumps('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) is False
