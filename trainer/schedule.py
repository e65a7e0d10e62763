"""The learning-rate schedule, built once from the spec: a frozen :class:`Schedule`.

lr(i) = peak * warmup_factor(i) * decay_factor(i), as Detectron2's ``WarmupMultiStepLR``
composes it, with Goyal et al.'s gradual warmup written in their own terms: start at
base_lr and add a constant each iteration so that the LR reaches the peak after
``warmup_epochs`` (i counted from 0, so iteration 0 runs at base_lr exactly). A step
milestone inside warmup applies at its own iteration, scaling the warmup LR (as Detectron2).

No torch here: the API server and the browser form draw the planned curve from this.
"""

from __future__ import annotations

import bisect
import itertools
import math
from dataclasses import dataclass
from typing import Any

from trainer.spec import RunSpec


@dataclass(frozen=True)
class Schedule:
    """The LR of every iteration of a run with ``iters_per_epoch`` iterations per epoch."""

    base_lr: float
    peak_lr: float
    warmup: str  # none | constant | gradual
    warmup_iters: int
    decay: str  # step | cosine | constant
    milestone_iters: tuple[int, ...]  # first iteration of each step decay
    decay_factor: float
    iters_per_epoch: int
    total_iters: int

    @classmethod
    def from_spec(cls, spec: RunSpec, iters_per_epoch: int | None = None) -> Schedule:
        ipe = iters_per_epoch or spec.iters_per_epoch
        # Warmup exists to reach an LR above base_lr safely; when kn <= ref_batch the peak
        # is not above base_lr, so there is nothing to warm up.
        warm = spec.warmup != "none" and spec.peak_lr > spec.base_lr
        return cls(
            base_lr=spec.base_lr,
            peak_lr=spec.peak_lr,
            warmup=spec.warmup,
            warmup_iters=int(round(spec.warmup_epochs * ipe)) if warm else 0,
            decay=spec.decay,
            milestone_iters=tuple(_first_iter_at(m, ipe) for m in spec.milestones),
            decay_factor=spec.decay_factor,
            iters_per_epoch=ipe,
            total_iters=spec.epochs * ipe,
        )

    def lr(self, it: int) -> float:
        """The LR used for the update of iteration ``it`` (0-based)."""
        w = self.warmup_iters
        gain = 1.0  # the step decays passed by ``it``, inside warmup too
        if self.decay == "step":
            # milestone_iters is sorted (milestones increase): O(log m), so a preview
            # of p points costs O(p log m), not O(p m) (POST /api/schedule is open).
            gain = self.decay_factor ** bisect.bisect_right(self.milestone_iters, it)
        if it < w:
            if self.warmup == "constant":
                return gain * self.base_lr
            # gradual: base_lr + (peak - base_lr) * i / W
            return gain * (self.base_lr + (self.peak_lr - self.base_lr) * it / w)
        if self.decay == "cosine":
            progress = min(1.0, (it - w) / max(1, self.total_iters - w))
            return self.peak_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
        return gain * self.peak_lr

    def breakpoints(self) -> list[int]:
        """Iterations where the schedule changes slope or jumps (kept in every preview)."""
        total, w = self.total_iters, self.warmup_iters
        pts = {0, total - 1}
        if w:
            pts.update({w - 1, w})
        if self.decay == "step":
            for i in self.milestone_iters:
                if 0 < i < total:
                    pts.update({i - 1, i})
        return sorted(p for p in pts if 0 <= p < total)

    def preview(self, max_points: int = 2000) -> dict[str, Any]:
        """The planned curve: lr per iteration, sampled evenly to about ``max_points``
        iterations when longer, always keeping the breakpoints (every jump drawn exactly)."""
        ipe, total = self.iters_per_epoch, self.total_iters
        if total <= max_points:
            steps = list(range(total))
        else:
            stride = total / max_points
            grid = {int(j * stride) for j in range(max_points)}
            steps = sorted(grid.union(self.breakpoints()))
        return {
            "iters_per_epoch": ipe,
            "total_iters": total,
            "warmup_iters": self.warmup_iters,
            "peak_lr": self.peak_lr,
            "step": steps,
            "epoch": [s / ipe for s in steps],
            "lr": [self.lr(s) for s in steps],
        }


def _first_iter_at(epoch: float, ipe: int) -> int:
    """The first iteration i with i / ipe >= epoch (float-exact, unlike ceil(epoch * ipe))."""
    # epoch * ipe may round either way: search from one below its ceiling
    return next(i for i in itertools.count(max(0, math.ceil(epoch * ipe) - 1)) if i / ipe >= epoch)


def lr_at(spec: RunSpec, it: int, iters_per_epoch: int | None = None) -> float:
    """``Schedule.from_spec(spec).lr(it)`` for callers that need one value."""
    return Schedule.from_spec(spec, iters_per_epoch).lr(it)


def schedule_preview(spec: RunSpec, max_points: int = 2000) -> dict[str, Any]:
    """The planned LR curve of ``spec`` without training (POST /api/schedule)."""
    return {**Schedule.from_spec(spec).preview(max_points), "total_batch": spec.total_batch}
