"""trainer.fit on tiny runs (synthetic data, CPU), and the summary figures on their own."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

import trainer.data
from trainer import RunConfigError, fit
from trainer.batches import epoch_permutation, micro_batch_size
from trainer.checkpoint import load_checkpoint
from trainer.data import Splits
from trainer.loop import FitResult
from trainer.metrics import (
    SUMMARY_KEYS,
    EvalPoint,
    SummaryTracker,
    first_reaching,
    median_last,
)
from trainer.models import build_model
from trainer.norms import norm_group_size, set_group_size
from trainer.optim import build_optimizer, set_lr
from trainer.schedule import lr_at
from trainer.sink import MemorySink
from trainer.spec import RunSpec

ITER_KEYS = {"loss", "train_err", "lr", "samples", "grad_norm", "step_time"}
EPOCH_KEYS = {
    "val_loss",
    "val_err",
    "epoch_time",
    "data_time",
    "compute_time",
    "train_loss_epoch",
    "train_err_epoch",
}
IPE = 5  # 160 training samples / kn = 32


pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


def tiny(**kw: Any) -> RunSpec:
    """k=4 workers of n=8 on 160 synthetic samples: 5 iterations per epoch.

    ref_batch 8 makes the peak LR 4x base_lr, so the gradual warmup changes the LR at
    every iteration of the first epoch and the milestone drops it in the second.
    """
    base: dict[str, Any] = {
        "model": "mlp",
        "dataset": "synthetic",
        "dataset_size": 200,
        "epochs": 2,
        "workers": 4,
        "batch_per_worker": 8,
        "base_lr": 0.05,
        "ref_batch": 8,
        "warmup": "gradual",
        "warmup_epochs": 1,
        "decay": "step",
        "milestones": [1.6],
        "device": "cpu",
        "seed": 3,
    }
    base.update(kw)
    if "milestones" not in kw and base["epochs"] <= 1.6:
        base["milestones"] = []  # a decay at or past the end is refused: none in short runs
    return RunSpec(**base)


def run(spec: RunSpec, run_dir: Path | None = None, **kw: Any) -> tuple[MemorySink, FitResult]:
    sink = MemorySink()
    result = fit(spec, sink, run_dir=run_dir, **kw)
    return sink, result


def loss_oscillation(losses: list[float]) -> float | None:
    """Mean absolute change of the loss between consecutive iterations (None if < 2)."""
    if len(losses) < 2:
        return None
    return sum(abs(b - a) for a, b in zip(losses, losses[1:], strict=False)) / (len(losses) - 1)


def max_rel(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def params_of(run_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(run_dir / "checkpoint.pt")
    assert state is not None
    return state["model"]


# --- what a run reports ------------------------------------------------------------------
def test_metric_keys_meta_and_summary() -> None:
    spec = tiny(noise_every=0, health_every=0)  # the probes' keys: tests/test_noise_scale.py
    sink, result = run(spec)
    assert result == FitResult("succeeded", 10, 2.0, None, result.summary, None)
    assert sink.closed
    by_step: dict[int, dict[str, tuple[float, float, float]]] = {}
    for key, step, epoch, wall, value in sink.points:
        assert key not in by_step.get(step, {}), f"{key} logged twice at step {step}"
        by_step.setdefault(step, {})[key] = (epoch, wall, value)
    assert sorted(by_step) == list(range(10))
    for step, values in by_step.items():
        epoch_end = step in (IPE - 1, 2 * IPE - 1)
        assert set(values) == ITER_KEYS | (EPOCH_KEYS if epoch_end else set())
        assert values["loss"][0] == pytest.approx((step + 1) / IPE)
        if epoch_end:
            assert values["val_err"][0] == (step + 1) / IPE  # integral epoch
    assert sink.series("lr") == [lr_at(spec, i) for i in range(10)]
    assert sink.series("lr")[0] == 0.05 and sink.series("lr")[IPE] == pytest.approx(0.2)
    assert sink.series("samples") == [32.0 * (i + 1) for i in range(10)]
    assert all(0.0 <= e <= 1.0 for k in ("train_err", "val_err") for e in sink.series(k))
    walls = [p[3] for p in sink.points if p[0] == "loss"]
    assert walls == sorted(walls) and walls[0] > 0
    losses = sink.series("loss")
    assert sink.series("train_loss_epoch") == pytest.approx(
        [sum(losses[:IPE]) / IPE, sum(losses[IPE:]) / IPE]
    )
    for total, data, compute in zip(
        sink.series("epoch_time"),
        sink.series("data_time"),
        sink.series("compute_time"),
        strict=True,
    ):
        assert data >= 0 and compute > 0 and data + compute == pytest.approx(total)

    model = build_model(spec)
    assert sink.meta["params"] == sum(p.numel() for p in model.parameters())
    assert {k: sink.meta[k] for k in ("iters_per_epoch", "total_iters", "total_batch")} == {
        "iters_per_epoch": IPE,
        "total_iters": 10,
        "total_batch": 32,
    }
    assert sink.meta["peak_lr"] == spec.peak_lr and sink.meta["device"] == "cpu"
    assert sink.meta["nproc"] == 1 and sink.meta["resumed"] is False

    summary = result.summary
    assert tuple(summary) == SUMMARY_KEYS
    assert summary["final_val_err"] == sink.series("val_err")[-1]
    assert summary["final_val_loss"] == sink.series("val_loss")[-1]
    assert summary["best_val_err"] == min(sink.series("val_err"))
    assert summary["final_train_err"] == sink.series("train_err_epoch")[-1]
    assert summary["median_last5_val_err"] == pytest.approx(
        sorted(sink.series("val_err"))[0] / 2 + sorted(sink.series("val_err"))[1] / 2
    )
    assert summary["loss_oscillation"] == pytest.approx(loss_oscillation(losses[5:]))
    assert summary["samples_per_s"] == pytest.approx(320 / sum(sink.series("step_time")))
    assert summary["wall_time_s"] >= sink.points[-1][3]
    assert (summary["peak_lr"], summary["total_batch"]) == (spec.peak_lr, 32)
    json.dumps(summary, allow_nan=False)


def test_one_iteration_equals_k_separate_workers(tmp_path: Path) -> None:
    """One pass with per-worker (grouped) BN and loss sum/kn == k workers, gradients summed.

    The reference runs each worker's n samples through its own forward (plain BN over n),
    divides each worker's summed loss by kn (Remark 3), sums the gradients (what the
    all-reduce does) and takes the SGD step. Running BN statistics are not compared: k
    sequential updates are not one update with the mean of the k workers' statistics.
    """
    spec = tiny(dataset_size=40, epochs=1, warmup="none", decay="constant", weight_decay=1e-3)
    assert spec.iters_per_epoch == 1
    sink, _ = run(spec, tmp_path)

    torch.manual_seed(spec.seed)
    splits = trainer.data.load_datasets(spec)
    model = build_model(spec, num_classes=splits.num_classes)
    set_group_size(model, None)  # each worker's forward is exactly its n samples
    opt = build_optimizer(model, spec)
    x, y = splits.train.tensors
    perm = epoch_permutation(spec.seed, 0, len(x))
    k, n = spec.workers, spec.batch_per_worker
    loss_total, wrong = 0.0, 0
    for j in range(k):
        idx = perm[j * n : (j + 1) * n]
        out = model(x[idx])
        loss = F.cross_entropy(out, y[idx], reduction="sum") / (k * n)
        loss.backward()
        loss_total += loss.item()
        wrong += int((out.argmax(1) != y[idx]).sum())
    grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    set_lr(opt, lr_at(spec, 0))
    opt.step()

    assert sink.series("loss") == [pytest.approx(loss_total, rel=1e-6)]
    assert sink.series("train_err") == [wrong / (k * n)]
    assert sink.series("grad_norm") == [pytest.approx(grad_norm.item(), rel=1e-5)]
    saved = params_of(tmp_path)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("micro", [8, 16, 24])
def test_micro_batches_of_whole_workers_match_one_pass(tmp_path: Path, micro: int) -> None:
    whole, _ = run(tiny(), tmp_path / "whole")
    split, _ = run(tiny(micro_batch=micro), tmp_path / "split")
    assert split.meta["micro_batch"] == micro
    assert max_rel(split.series("loss"), whole.series("loss")) < 1e-5
    assert split.series("train_err") == whole.series("train_err")
    a, b = params_of(tmp_path / "split"), params_of(tmp_path / "whole")
    for name in a:
        if "running" not in name and a[name].is_floating_point():
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6)


def test_micro_batch_below_n_takes_bn_statistics_per_micro_batch() -> None:
    spec = tiny(micro_batch=4, epochs=1, warmup="none", decay="constant")
    sink, result = run(spec)
    assert result.status == "succeeded" and sink.meta["micro_batch"] == 4
    # Step 0's loss is that of one pass with BN groups of 4 over the iteration's samples.
    torch.manual_seed(spec.seed)
    splits = trainer.data.load_datasets(spec)
    model = build_model(spec, num_classes=splits.num_classes)
    set_group_size(model, 4)
    x, y = splits.train.tensors
    idx = epoch_permutation(spec.seed, 0, len(x))[:32]
    expected = F.cross_entropy(model(x[idx]), y[idx]).item()
    assert sink.series("loss")[0] == pytest.approx(expected, rel=1e-6)


def test_norm_group_sizes_and_micro_batch_sizes() -> None:
    assert micro_batch_size(128, 32, None) == 128
    assert micro_batch_size(128, 32, 200) == 128
    assert micro_batch_size(128, 32, 80) == 64  # whole workers only
    assert micro_batch_size(128, 32, 8) == 8
    assert norm_group_size(tiny(), 32) == 8
    assert norm_group_size(tiny(), 4) == 4
    assert norm_group_size(tiny(norm="bn_ghost", ghost_batch=4), 16) == 4
    assert norm_group_size(tiny(norm="bn_ghost", batch_per_worker=24, ghost_batch=8), 12) == 4
    assert norm_group_size(tiny(norm="bn_sync"), 32) is None


@pytest.mark.parametrize(
    ("model", "norm", "extra"),
    [
        ("mnist1d_cnn", "bn_local", {}),
        ("mnist1d_cnn", "bn_sync", {}),
        ("mnist1d_cnn", "bn_ghost", {"ghost_batch": 4}),
        ("mlp", "frn", {}),
        ("mnist1d_cnn", "gn", {}),
        ("mlp", "none", {"optimizer": "lars", "base_lr": 2.0}),
        ("mlp", "bn_local", {"optimizer": "lamb", "base_lr": 0.002}),
    ],
)
def test_models_norms_and_optimizers_train(model: str, norm: str, extra: dict) -> None:
    sink, result = run(tiny(model=model, norm=norm, epochs=3, **extra))
    assert result.status == "succeeded"
    losses = sink.series("loss")
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-IPE:]) < sum(losses[:IPE])  # it learns


def test_momentum_forms_through_fit() -> None:
    """Warmup changes the LR every iteration: Caffe form == PyTorch form only corrected."""
    pytorch, _ = run(tiny())
    caffe, _ = run(tiny(momentum_form="caffe"))
    uncorrected, _ = run(tiny(momentum_form="caffe", momentum_correction=False))
    assert max_rel(caffe.series("loss"), pytorch.series("loss")) < 1e-5
    assert uncorrected.series("loss")[:2] == pytest.approx(pytorch.series("loss")[:2], rel=1e-6)
    assert max_rel(uncorrected.series("loss"), pytorch.series("loss")) > 1e-3


def test_bf16_autocast() -> None:
    fp32, _ = run(tiny(epochs=1, warmup="none"))
    bf16, result = run(tiny(epochs=1, warmup="none", precision="bf16"))
    assert result.status == "succeeded"
    assert all(math.isfinite(v) for v in bf16.series("loss"))
    # bf16 matmuls round differently: the same run, visibly not bit-identical.
    assert bf16.series("loss")[0] != fp32.series("loss")[0]
    assert bf16.series("loss")[0] == pytest.approx(fp32.series("loss")[0], rel=0.05)


# --- divergence, cancel, resume -----------------------------------------------------------
def test_divergence_stops_the_run_at_its_step() -> None:
    spec = tiny(base_lr=1000.0, ref_batch=32, warmup="none", decay="constant", epochs=2)
    sink, result = run(spec)
    assert result.status == "diverged"
    step = result.diverged_step
    assert step is not None and 0 < step < 10
    assert sink.steps("loss") == list(range(step + 1))  # logged up to and including it
    losses = sink.series("loss")
    bad = losses[-1]
    assert not math.isfinite(bad) or bad > spec.divergence_factor * losses[0]
    assert all(math.isfinite(v) and v <= spec.divergence_factor * losses[0] for v in losses[:-1])
    assert result.iterations == step + 1 and f"step {step}" in (result.error or "")
    assert len(sink.series("val_err")) == (step + 1) // IPE
    json.dumps(result.summary, allow_nan=False)


def test_cancel_at_the_first_poll(tmp_path: Path) -> None:
    asked: list[int] = []  # the first ask is before training (a cancel during data loading)

    def second_ask() -> bool:
        asked.append(1)
        return len(asked) > 1

    sink, result = run(tiny(), tmp_path, should_stop=second_ask)
    assert result.status == "cancelled" and result.iterations == 1
    assert sink.steps("loss") == [0] and sink.closed
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cancel_while_data_loads_stops_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cancelled = threading.Event()
    real_load = trainer.data.load_datasets

    def slow_load(spec: RunSpec, should_stop: Any = None) -> Any:
        splits = real_load(spec)
        cancelled.set()  # the user cancels while the data is being built
        return splits

    monkeypatch.setattr(trainer.data, "load_datasets", slow_load)
    sink, result = run(tiny(), tmp_path, should_stop=cancelled.is_set)
    assert result.status == "cancelled" and result.iterations == 0
    assert sink.steps("loss") == [] and sink.closed
    assert not (tmp_path / "checkpoint.pt").exists()


def test_cancel_while_mnist1d_generates_stops_the_generator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large MNIST-1D set takes minutes to generate: a cancel must not wait for it."""
    import time

    monkeypatch.setenv("BATCHLAB_DATA_CACHE", str(tmp_path / "cache"))
    spec = RunSpec(dataset="mnist1d", dataset_size=20_000, model="mlp", epochs=1, warmup="none")
    t0 = time.monotonic()
    _, result = run(spec, tmp_path / "run", should_stop=lambda: True)
    assert result.status == "cancelled" and result.iterations == 0
    assert time.monotonic() - t0 < 10  # about a second; generating all of it takes ~40 s
    assert not list((tmp_path / "cache").glob("*.npz"))  # no partial set cached
    import mnist1d.data

    assert mnist1d.data.transform.__module__ == "mnist1d.transform"  # restored after


def test_cancel_during_the_last_epoch_is_cancelled_not_succeeded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainer.loop

    monkeypatch.setattr(trainer.loop, "MAX_FLUSH_EVERY", 1)  # flush and poll every step
    monkeypatch.setattr(trainer.loop, "POLL_INTERVAL_S", 0.0)
    sink = MemorySink()
    stop_at = IPE + 2  # mid-way through the second and last epoch
    result = fit(
        tiny(epochs=2),
        sink,
        run_dir=tmp_path,
        should_stop=lambda: stop_at in sink.steps("loss"),
    )
    assert result.status == "cancelled"
    assert stop_at < result.iterations < 2 * IPE
    assert sink.steps("val_err") == [IPE - 1]  # the last epoch's end never came


def test_extended_run_measures_oscillation_over_its_own_second_half(tmp_path: Path) -> None:
    """Extending a run (more epochs, resumed from its checkpoint) moves the planned second
    half; loss_oscillation must be the straight run's, not the parent's window."""
    flat = {"decay": "constant", "warmup": "none", "milestones": [], "checkpoint": True}
    run(tiny(epochs=2, **flat), tmp_path / "extended")
    _, extended = run(tiny(epochs=4, **flat), tmp_path / "extended")
    _, straight = run(tiny(epochs=4, **flat), tmp_path / "straight")
    assert extended.iterations == straight.iterations
    assert extended.summary["loss_oscillation"] == pytest.approx(
        straight.summary["loss_oscillation"], rel=1e-5
    )


def test_resume_after_cancel_follows_the_straight_run(tmp_path: Path) -> None:
    spec = tiny(epochs=4, milestones=[3.0])
    straight, done = run(spec, tmp_path / "a")
    assert done.status == "succeeded"

    first = MemorySink()
    cancelled = fit(
        spec,
        first,
        run_dir=tmp_path / "b",
        should_stop=lambda: any(p[0] == "val_err" for p in first.points),
    )
    assert cancelled.status == "cancelled"
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state is not None
    epochs_done = state["epoch"]
    # Stopped after epoch 1 was validated: at the end of epoch 2 (the forced poll), or
    # mid-epoch 2 if a second passed (the checkpoint of epoch 1 is kept then).
    assert epochs_done in (1, 2) and state["iteration"] == epochs_done * IPE
    n_first = len(first.series("loss"))
    assert first.series("loss") == straight.series("loss")[:n_first]

    resumed, result = run(spec, tmp_path / "b")
    assert result.status == "succeeded" and result.iterations == 20
    assert resumed.meta["resumed"] is True and resumed.meta["start_step"] == epochs_done * IPE
    assert resumed.steps("loss") == list(range(epochs_done * IPE, 20))
    assert resumed.series("loss") == straight.series("loss")[epochs_done * IPE :]  # bitwise
    assert min(p[3] for p in resumed.points) > state["wall_time"]  # the clock continues
    a, b = params_of(tmp_path / "a"), params_of(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)
    for key in ("final_val_err", "best_val_err", "median_last5_val_err", "loss_oscillation"):
        assert result.summary[key] == done.summary[key]


def test_resume_refuses_a_checkpoint_of_another_spec(tmp_path: Path) -> None:
    run(tiny(epochs=1, warmup="none"), tmp_path)
    with pytest.raises(RunConfigError, match="base_lr"):
        run(tiny(epochs=1, warmup="none", base_lr=0.07), tmp_path)
    # Fields that do not change the trajectory may differ; the finished run returns at once.
    sink, result = run(tiny(epochs=1, warmup="none", eval_every=3), tmp_path)
    assert result.status == "succeeded" and sink.points == [] and result.iterations == IPE
    _, fresh = run(tiny(epochs=1, warmup="none", base_lr=0.07), tmp_path, resume=False)
    assert fresh.status == "succeeded"


# --- evaluation and targets ---------------------------------------------------------------
def test_eval_every_validates_periodically_and_at_the_end() -> None:
    sink, _ = run(tiny(epochs=3, eval_every=2))
    assert sink.steps("val_err") == [2 * IPE - 1, 3 * IPE - 1]
    assert sink.steps("train_err_epoch") == [IPE - 1, 2 * IPE - 1, 3 * IPE - 1]


def test_time_iterations_and_epochs_to_target() -> None:
    sink, result = run(tiny(epochs=3, target_accuracy=0.01))
    first_val = next(p for p in sink.points if p[0] == "val_err")
    assert result.summary["iters_to_target"] == IPE
    assert result.summary["epochs_to_target"] == 1
    assert result.summary["time_to_target_s"] == first_val[3]
    _, never = run(tiny(epochs=1, warmup="none", target_accuracy=1.0))
    assert never.summary["time_to_target_s"] is None and never.summary["iters_to_target"] is None


class _Lazy(Dataset):
    """A map-style dataset that is not a TensorDataset (like data.py's large sets)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        return self.inner[i]


def test_lazy_datasets_go_through_a_dataloader_with_the_same_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spec = tiny(epochs=1, warmup="none")
    direct, _ = run(spec)
    real = trainer.data.load_datasets

    def lazy(s: RunSpec, should_stop: Any = None) -> Splits:
        splits = real(s)
        return Splits(_Lazy(splits.train), _Lazy(splits.val), splits.num_classes, (40,))

    monkeypatch.setattr(trainer.data, "load_datasets", lazy)
    loaded, result = run(spec)
    assert result.status == "succeeded" and loaded.meta["in_memory"] is False
    assert loaded.series("loss") == pytest.approx(direct.series("loss"), rel=1e-6)
    assert loaded.series("val_err") == direct.series("val_err")


# --- summary figures (pure) -----------------------------------------------------------------
def test_median_last_and_first_reaching() -> None:
    assert median_last([0.9, 0.5, 0.4, 0.3, 0.2, 0.35]) == 0.35
    assert median_last([0.4, 0.2]) == pytest.approx(0.3)
    assert median_last([]) is None
    evals = [
        EvalPoint(5, 1, 1.5, 0.5, 1.2),
        EvalPoint(10, 2, 3.0, 0.2, 0.8),
        EvalPoint(15, 3, 4.5, 0.1, 0.5),
    ]
    assert first_reaching(evals, 0.8) is evals[1]  # accuracy 1 - 0.2 reaches 0.8
    assert first_reaching(evals, 0.95) is None
    assert first_reaching(evals, None) is None


def test_tracker_loss_oscillation_is_over_the_planned_second_half() -> None:
    losses = [3.0, 2.5, 2.7, 2.0, 2.2, 1.9, 2.1, 1.8]
    tracker = SummaryTracker(total_iters=8, total_batch=32, peak_lr=0.4)
    for step, loss in enumerate(losses):
        tracker.add_iteration(step, loss, 0.5)
    summary = tracker.summary()
    # Pairs (4,5), (5,6), (6,7): |1.9-2.2| + |2.1-1.9| + |1.8-2.1| over 3.
    assert summary["loss_oscillation"] == pytest.approx(0.8 / 3)
    assert summary["loss_oscillation"] == pytest.approx(loss_oscillation(losses[4:]))
    assert summary["samples_per_s"] == 8 * 32 / 4.0
    assert tracker.first_loss == 3.0 and tracker.iterations == 8
    assert loss_oscillation([1.0]) is None


def test_tracker_state_round_trip_and_non_finite_values() -> None:
    tracker = SummaryTracker(total_iters=4, total_batch=8, peak_lr=0.1, target_accuracy=0.7)
    for step, loss in enumerate([2.0, 1.5, 1.2, 1.0]):
        tracker.add_iteration(step, loss, 0.1)
    tracker.add_epoch(0.4)
    tracker.add_eval(EvalPoint(4, 1, 2.0, 0.25, 0.9))
    tracker.wall_time = 2.5
    state = json.loads(json.dumps(tracker.state_dict()))
    again = SummaryTracker.from_state_dict(state)
    assert again.summary() == tracker.summary()
    assert again.summary()["time_to_target_s"] == 2.0
    again.add_iteration(4, float("nan"), 0.1)
    assert again.summary()["loss_oscillation"] is None  # nan -> None: JSON stays valid


def running_stats(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in params_of(run_dir).items() if "running" in k}


@pytest.mark.parametrize(
    "extra",
    [
        {"micro_batch": 16},  # chunks of two whole workers
        {"micro_batch": 4},  # chunks below n: BN groups of 4
        {"norm": "cbn", "micro_batch": 16},
    ],
    ids=["workers", "below-n", "cbn"],
)
def test_running_stats_do_not_depend_on_micro_batches(tmp_path: Path, extra: dict) -> None:
    """One iteration forwarded in chunks leaves the running statistics one pass leaves."""
    spec = tiny(epochs=1, dataset_size=40, warmup="none", **extra)  # 32 samples: 1 iteration
    whole = spec.model_copy(update={"micro_batch": None})
    if spec.micro_batch < spec.batch_per_worker:  # the same BN groups in both runs
        whole = whole.model_copy(update={"batch_per_worker": 4, "workers": 8})
    run(spec, tmp_path / "chunks")
    run(whole, tmp_path / "whole")
    a, b = running_stats(tmp_path / "chunks"), running_stats(tmp_path / "whole")
    assert a.keys() == b.keys() and len(a) >= 4
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_samples_dropped_per_epoch_is_reported(tmp_path: Path) -> None:
    # 160 training samples, kn = 48: 3 iterations per epoch use 144, 16 are left out.
    sink, result = run(tiny(epochs=1, workers=6))
    assert sink.meta["samples_dropped_per_epoch"] == 16
    assert result.summary["samples_dropped_per_epoch"] == 16
    _, exact = run(tiny(epochs=1))
    assert exact.summary["samples_dropped_per_epoch"] == 0


def test_fit_result_to_dict() -> None:
    result = FitResult("diverged", 7, 1.4, 6, {"final_val_err": None}, "loss nan at step 6")
    assert result.to_dict() == {
        "status": "diverged",
        "iterations": 7,
        "epochs": 1.4,
        "diverged_step": 6,
        "summary": {"final_val_err": None},
        "error": "loss nan at step 6",
    }
    assert FitResult(**result.to_dict()) == result
