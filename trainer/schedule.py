"""The learning-rate schedule: a pure function of the iteration.

lr(i) = peak * warmup_factor(i) * decay_factor(i), as Detectron2's ``WarmupMultiStepLR``
composes it, with Goyal et al.'s gradual warmup written in their own terms: start at
base_lr and add a constant each iteration so that the LR reaches the peak after
``warmup_epochs`` (i counted from 0, so iteration 0 runs at base_lr exactly).

No torch here: the API server and the browser form draw the planned curve from this.
"""

from __future__ import annotations

import math
from typing import Any

from trainer.spec import RunSpec


def warmup_iters(spec: RunSpec, iters_per_epoch: int | None = None) -> int:
    """Iterations spent warming up (0 when warmup is off).

    Warmup exists to reach an LR above base_lr safely; when kn <= ref_batch the peak is not
    above base_lr, so there is nothing to warm up and the run starts at its peak."""
    if spec.warmup == "none" or spec.peak_lr <= spec.base_lr:
        return 0
    ipe = iters_per_epoch or spec.iters_per_epoch
    return int(round(spec.warmup_epochs * ipe))


def lr_at(spec: RunSpec, it: int, iters_per_epoch: int | None = None) -> float:
    """The LR used for the update of iteration ``it`` (0-based)."""
    ipe = iters_per_epoch or spec.iters_per_epoch
    peak = spec.peak_lr
    w = warmup_iters(spec, ipe)
    if it < w:
        if spec.warmup == "constant":
            return spec.base_lr
        # gradual: base_lr + (peak - base_lr) * i / W
        return spec.base_lr + (peak - spec.base_lr) * it / w
    epoch = it / ipe
    if spec.decay == "step":
        passed = sum(1 for m in spec.milestones if epoch >= m)
        return peak * spec.decay_factor**passed
    if spec.decay == "cosine":
        total = spec.epochs * ipe
        span = max(1, total - w)
        progress = min(1.0, (it - w) / span)
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak


def breakpoints(spec: RunSpec, iters_per_epoch: int | None = None) -> list[int]:
    """Iterations where the schedule changes slope or jumps (kept in every preview)."""
    ipe = iters_per_epoch or spec.iters_per_epoch
    total = spec.epochs * ipe
    w = warmup_iters(spec, ipe)
    pts = {0, total - 1}
    if w:
        pts.update({w - 1, w})
    if spec.decay == "step":
        for m in spec.milestones:
            i = math.ceil(m * ipe)
            if 0 < i < total:
                pts.update({i - 1, i})
    return sorted(p for p in pts if 0 <= p < total)


def schedule_preview(spec: RunSpec, max_points: int = 2000) -> dict[str, Any]:
    """The planned LR curve without training: iterations per epoch and lr per iteration.

    Long schedules are sampled evenly to about ``max_points`` iterations, always keeping
    the breakpoints (warmup end, milestones), so a drawn curve shows every jump exactly.
    """
    ipe = spec.iters_per_epoch
    total = spec.epochs * ipe
    if total <= max_points:
        steps = list(range(total))
    else:
        stride = total / max_points
        grid = {int(j * stride) for j in range(max_points)}
        steps = sorted(grid.union(breakpoints(spec, ipe)))
    return {
        "iters_per_epoch": ipe,
        "total_iters": total,
        "warmup_iters": warmup_iters(spec, ipe),
        "total_batch": spec.total_batch,
        "peak_lr": spec.peak_lr,
        "step": steps,
        "epoch": [s / ipe for s in steps],
        "lr": [lr_at(spec, s, ipe) for s in steps],
    }
