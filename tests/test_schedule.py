"""The LR schedule against the paper's formulas and two reference implementations."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.schedule import Schedule, lr_at, schedule_preview
from trainer.spec import RunSpec


def make(**kw: object) -> RunSpec:
    # synthetic, 8000 training samples; kn = 32*32 = 1024 -> k = 4 relative to 256.
    base: dict[str, object] = {
        "dataset": "synthetic",
        "dataset_size": 10_000,
        "workers": 32,
        "batch_per_worker": 32,
        "epochs": 20,
        "warmup_epochs": 2,
        "milestones": [8.0, 15.0],
    }
    base.update(kw)
    return RunSpec(**base)


def test_linear_rule_peak() -> None:
    spec = RunSpec(
        dataset="synthetic", dataset_size=500_000, workers=256, batch_per_worker=32, epochs=90
    )
    assert spec.peak_lr == pytest.approx(3.2)
    w = Schedule.from_spec(spec).warmup_iters
    assert lr_at(spec, w) == pytest.approx(3.2)


def test_gradual_warmup_starts_at_base_and_reaches_peak_at_w() -> None:
    spec = make()
    ipe = spec.iters_per_epoch  # 8000 // 1024 = 7
    w = Schedule.from_spec(spec).warmup_iters
    assert w == 2 * ipe
    assert lr_at(spec, 0) == spec.base_lr  # iteration 0 runs at eta exactly
    assert lr_at(spec, w) == pytest.approx(spec.peak_lr)
    steps = [lr_at(spec, i + 1) - lr_at(spec, i) for i in range(w)]
    assert all(s == pytest.approx((spec.peak_lr - spec.base_lr) / w) for s in steps)


def test_gradual_warmup_equals_torch_linear_lr() -> None:
    """Goyal's ramp == LinearLR(start_factor=1/k, total_iters=W) on base k*eta."""
    spec = make()
    k = spec.total_batch / spec.ref_batch
    w = Schedule.from_spec(spec).warmup_iters
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=k * spec.base_lr)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1 / k, total_iters=w)
    for it in range(w + 5):
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(spec, it), rel=1e-12)
        opt.step()
        sched.step()


def test_gradual_warmup_equals_detectron2_formula() -> None:
    """Detectron2 WarmupMultiStepLR, linear: factor = F(1 - a) + a, a = it / W, F = 1/k."""
    spec = make()
    k = spec.total_batch / spec.ref_batch
    w = Schedule.from_spec(spec).warmup_iters
    ipe = spec.iters_per_epoch
    milestones = [math.ceil(m * ipe) for m in spec.milestones]
    for it in range(spec.total_iters):
        alpha = it / w
        factor = (1 / k) * (1 - alpha) + alpha if it < w else 1.0
        gamma = spec.decay_factor ** sum(1 for m in milestones if it >= m)
        assert lr_at(spec, it) == pytest.approx(k * spec.base_lr * factor * gamma, rel=1e-12)


def test_constant_warmup_jumps_at_w() -> None:
    spec = make(warmup="constant")
    w = Schedule.from_spec(spec).warmup_iters
    assert all(lr_at(spec, i) == spec.base_lr for i in range(w))
    assert lr_at(spec, w) == pytest.approx(spec.peak_lr)


def test_no_warmup_starts_at_peak() -> None:
    spec = make(warmup="none")
    assert Schedule.from_spec(spec).warmup_iters == 0
    assert lr_at(spec, 0) == pytest.approx(spec.peak_lr)


def test_step_decay_at_milestones() -> None:
    spec = make()
    ipe = spec.iters_per_epoch
    first, second = (math.ceil(m * ipe) for m in spec.milestones)
    assert lr_at(spec, first - 1) == pytest.approx(spec.peak_lr)
    assert lr_at(spec, first) == pytest.approx(spec.peak_lr * 0.1)
    assert lr_at(spec, second - 1) == pytest.approx(spec.peak_lr * 0.1)
    assert lr_at(spec, second) == pytest.approx(spec.peak_lr * 0.01)


def test_cosine_decay_after_warmup() -> None:
    spec = make(decay="cosine")
    w, total = Schedule.from_spec(spec).warmup_iters, spec.total_iters
    assert lr_at(spec, w) == pytest.approx(spec.peak_lr)
    mid = w + (total - w) // 2
    assert lr_at(spec, mid) == pytest.approx(
        spec.peak_lr * 0.5 * (1 + math.cos(math.pi * (mid - w) / (total - w)))
    )
    assert lr_at(spec, total - 1) < 0.01 * spec.peak_lr
    values = [lr_at(spec, i) for i in range(w, total)]
    assert values == sorted(values, reverse=True)


def test_sqrt_rule_peak_is_reached() -> None:
    spec = make(scaling="sqrt")
    assert spec.peak_lr == pytest.approx(0.1 * 2.0)  # sqrt(1024 / 256)
    assert lr_at(spec, Schedule.from_spec(spec).warmup_iters) == pytest.approx(0.2)


def test_schedule_preview_keeps_breakpoints() -> None:
    spec = make(
        dataset_size=1_000_000,
        workers=1,
        batch_per_worker=32,
        ref_batch=8,
        epochs=30,
        warmup_epochs=1.5,
        milestones=[10.3, 20.7],
    )
    assert spec.total_iters > 100_000
    preview = schedule_preview(spec, max_points=500)
    steps = preview["step"]
    assert len(steps) < 520 and steps == sorted(set(steps))
    for b in Schedule.from_spec(spec).breakpoints():
        assert b in steps
    w = preview["warmup_iters"]
    assert {w - 1, w} <= set(steps)
    for s, lr in zip(steps, preview["lr"], strict=True):
        assert lr == lr_at(spec, s)
    assert preview["epoch"][-1] == pytest.approx(steps[-1] / spec.iters_per_epoch)
    assert preview["total_iters"] == spec.total_iters and steps[-1] == spec.total_iters - 1


def test_short_schedule_preview_has_every_iteration() -> None:
    spec = make()
    preview = schedule_preview(spec)
    assert preview["step"] == list(range(spec.total_iters))
    assert preview["peak_lr"] == spec.peak_lr and preview["total_batch"] == 1024


def test_no_warmup_below_the_reference_batch() -> None:
    """Warmup only raises the LR: at kn <= ref_batch the run starts at its (lower) peak."""
    spec = RunSpec(
        dataset="synthetic",
        dataset_size=2000,
        workers=1,
        batch_per_worker=32,
        base_lr=0.1,
        ref_batch=256,
        warmup="gradual",
        warmup_epochs=2,
        epochs=4,
    )
    assert Schedule.from_spec(spec).warmup_iters == 0
    assert lr_at(spec, 0) == pytest.approx(0.1 * 32 / 256)


def detectron2_lr(spec: RunSpec, it: int) -> float:
    """Detectron2's WarmupMultiStepLR (linear): base * factor(it) * gamma^(milestones passed)."""
    sched = Schedule.from_spec(spec)
    w, k = sched.warmup_iters, spec.peak_lr / spec.base_lr
    alpha = it / w if w else 1.0
    factor = (1 / k) * (1 - alpha) + alpha if it < w else 1.0
    passed = sum(1 for m in sched.milestone_iters if it >= m)
    return spec.peak_lr * factor * spec.decay_factor**passed


def test_a_milestone_inside_warmup_applies_at_its_iteration_as_detectron2() -> None:
    # kn = 4096 (k = 16, peak 1.6), 31 iterations per epoch, warmup W = 155 iterations; the
    # first milestone (epoch 3, iteration 93) falls inside warmup.
    spec = make(dataset_size=160_000, workers=128, epochs=25, warmup_epochs=5, milestones=[3, 20])
    sched = Schedule.from_spec(spec)
    assert (sched.iters_per_epoch, sched.warmup_iters) == (31, 155)
    assert sched.milestone_iters == (93, 620)
    assert lr_at(spec, 92) == pytest.approx(0.1 + 1.5 * 92 / 155)
    assert lr_at(spec, 93) == pytest.approx(0.1 * (0.1 + 1.5 * 93 / 155))  # not 1.0
    assert lr_at(spec, 154) == pytest.approx(0.1 * (0.1 + 1.5 * 154 / 155))  # not 1.59
    assert lr_at(spec, 155) == pytest.approx(0.16)
    for it in range(sched.total_iters):
        assert sched.lr(it) == pytest.approx(detectron2_lr(spec, it), rel=1e-12)


def test_constant_warmup_decays_at_a_milestone_inside_it() -> None:
    spec = make(warmup="constant", warmup_epochs=4, milestones=[2.0, 15.0])
    sched = Schedule.from_spec(spec)
    m = sched.milestone_iters[0]
    assert m < sched.warmup_iters
    assert sched.lr(m - 1) == spec.base_lr and sched.lr(m) == pytest.approx(spec.base_lr * 0.1)
    assert sched.lr(sched.warmup_iters) == pytest.approx(spec.peak_lr * 0.1)


def test_milestone_iterations_are_float_exact() -> None:
    """A fractional milestone decays at the first iteration i with i / ipe >= epoch."""
    spec = make(dataset_size=1250, workers=1, batch_per_worker=100, milestones=[0.3, 1.7])
    sched = Schedule.from_spec(spec)  # 10 iterations per epoch; 0.3 * 10 = 3.0000000000000004
    assert sched.iters_per_epoch == 10 and sched.milestone_iters == (3, 17)
