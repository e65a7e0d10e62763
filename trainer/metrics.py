"""A run's summary figures, computed from its metric stream (pure Python, no torch).

The loop feeds a :class:`SummaryTracker` with every iteration's loss and time and every
epoch's errors; :meth:`SummaryTracker.summary` turns them into the keys of docs/design.md.
The tracker's state is a small JSON-able dict, saved in checkpoints so a resumed run
reports the same figures as a straight one.

Definitions (docs/runspec.md repeats them for users):

- ``median_last5_val_err``: median of the last 5 *evaluations* (the paper's report is the
  median of the last 5 epochs; with ``eval_every > 1`` these are the last 5 evaluations).
- ``time_to_target_s`` / ``iters_to_target`` / ``epochs_to_target``: the first
  evaluation whose accuracy ``1 - val_err`` reaches ``target_accuracy``; time is the run's
  wall clock when that evaluation finished, iterations and epochs are those completed.
- ``loss_oscillation``: mean of ``|loss_t - loss_{t-1}|`` over consecutive iterations in
  the planned second half of training (``t - 1 >= total_iters // 2``), the "loss
  oscillation between iterations" of seed 004, measured where the LR schedule no longer
  drives the loss down fast, so it reflects minibatch noise rather than progress.
- ``samples_per_s``: samples trained / time spent in training iterations (data + compute,
  excluding validation and checkpoints).
- ``wall_time_s``: the run's wall clock at its end (setup excluded, resumes continue it).
- ``samples_dropped_per_epoch``: training samples past the last full minibatch of kn,
  never trained on in that epoch (a different tail each epoch, as the shuffle changes).

Figures that do not exist (no evaluation yet, target never reached, non-finite values of a
diverged run) are None, so summaries stay valid JSON.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from core.jsonsafe import finite_or_none

SUMMARY_KEYS: tuple[str, ...] = (
    "final_val_err",
    "final_val_loss",
    "best_val_err",
    "final_train_err",
    "median_last5_val_err",
    "time_to_target_s",
    "iters_to_target",
    "epochs_to_target",
    "loss_oscillation",
    "samples_per_s",
    "wall_time_s",
    "peak_lr",
    "total_batch",
    "samples_dropped_per_epoch",
)


@dataclass(frozen=True)
class EvalPoint:
    """One validation: after ``iterations`` iterations (``epoch`` whole epochs)."""

    iterations: int
    epoch: int
    wall_time: float
    val_err: float
    val_loss: float


def median_last(values: Sequence[float], count: int = 5) -> float | None:
    """Median of the last ``count`` values (fewer if there are fewer); None when empty."""
    if not values:
        return None
    return float(statistics.median(values[-count:]))


def first_reaching(evals: Sequence[EvalPoint], target_accuracy: float | None) -> EvalPoint | None:
    """The first evaluation whose accuracy (1 - val_err) is at least ``target_accuracy``."""
    if target_accuracy is None:
        return None
    for point in evals:
        if 1.0 - point.val_err >= target_accuracy:
            return point
    return None


@dataclass
class SummaryTracker:
    """Accumulates what the summary needs, in O(1) memory per iteration."""

    total_iters: int
    total_batch: int
    peak_lr: float
    target_accuracy: float | None = None
    samples_dropped_per_epoch: int = 0
    backward_splits: int = 1  # an iteration (update) covers total_batch / this samples
    first_loss: float | None = None
    iterations: int = 0
    train_time: float = 0.0
    wall_time: float = 0.0
    train_errs: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)
    # Streaming loss_oscillation over the planned second half.
    osc_sum: float = 0.0
    osc_count: int = 0
    prev_step: int | None = None
    prev_loss: float | None = None

    def add_iteration(self, step: int, loss: float, step_time: float) -> None:
        """Record iteration ``step`` (0-based, global)."""
        if self.first_loss is None:
            self.first_loss = loss
        self.iterations = step + 1
        self.train_time += step_time
        start = self.total_iters // 2
        if self.prev_step == step - 1 and self.prev_loss is not None and step - 1 >= start:
            self.osc_sum += abs(loss - self.prev_loss)
            self.osc_count += 1
        self.prev_step, self.prev_loss = step, loss

    def add_epoch(self, train_err_epoch: float) -> None:
        self.train_errs.append(train_err_epoch)

    def add_eval(self, point: EvalPoint) -> None:
        self.evals.append(point)

    def summary(self) -> dict[str, Any]:
        """The summary keys of docs/design.md (None where a figure does not exist)."""
        last = self.evals[-1] if self.evals else None
        hit = first_reaching(self.evals, self.target_accuracy)
        out: dict[str, Any] = {
            "final_val_err": last.val_err if last else None,
            "final_val_loss": last.val_loss if last else None,
            "best_val_err": min(p.val_err for p in self.evals) if self.evals else None,
            "final_train_err": self.train_errs[-1] if self.train_errs else None,
            "median_last5_val_err": median_last([p.val_err for p in self.evals]),
            "time_to_target_s": hit.wall_time if hit else None,
            "iters_to_target": hit.iterations if hit else None,
            "epochs_to_target": hit.epoch if hit else None,
            "loss_oscillation": self.osc_sum / self.osc_count if self.osc_count else None,
            "samples_per_s": (
                self.iterations * self.total_batch / self.backward_splits / self.train_time
                if self.train_time
                else None
            ),
            "wall_time_s": self.wall_time,
            "peak_lr": self.peak_lr,
            "total_batch": self.total_batch,
            "samples_dropped_per_epoch": self.samples_dropped_per_epoch,
        }
        return {k: finite_or_none(v) for k, v in out.items()}

    # --- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = asdict(self)
        state["evals"] = [asdict(p) for p in self.evals]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> SummaryTracker:
        data = dict(state)
        data["evals"] = [EvalPoint(**p) for p in data.get("evals", [])]
        data["train_errs"] = list(data.get("train_errs", []))
        return cls(**data)
