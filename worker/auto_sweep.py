"""Auto sweeps (``POST /api/sweeps`` with ``"batch_sizes": "auto"``): once the baseline
has finished, queue the ladder of batch sizes around its measured noise scale.

``advance(engine, group_id)`` is the one function that does it, and it is idempotent:
the ladder's runs are created in the transaction of ``store.runs.settle_auto``, a
compare-and-set ``waiting -> queued | failed`` on the group row, so of any number of
callers exactly one creates them. It is called from two places:
- the worker, right after it records a baseline's final status (``after_run``);
- the API's reconciler every 10 s (``advance_waiting`` in
  ``worker.recovery.reconcile_queued``), the backstop for every other way a baseline
  ends: cancelled while queued, failed by the reaper, a worker that died between its
  ``mark_finished`` and this call.
Messages are sent after the commit; a send that fails leaves the run queued with no
message, which the reconciler re-sends after ``BATCHLAB_RESEND_AFTER_S``.

A baseline that ends without a noise scale (``noise_every: 0``, failed, cancelled,
diverged) settles the sweep as ``failed`` with the reason, and nothing is queued.
Torch-free: the API imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.engine import Engine

from core.status import ACTIVE_STATUSES, RunStatus
from store import advice as store_advice
from store import db, runs
from trainer import advice
from trainer.plan import default_name, plan_ladder
from trainer.spec import RunSpec
from worker.recovery import publish

log = logging.getLogger(__name__)

Enqueue = Callable[[int, RunSpec], Any]


@dataclass
class Settled:
    """What ``advance`` did to one auto sweep."""

    group_id: int
    state: str  # store.runs.AUTO_QUEUED | AUTO_FAILED
    message: str
    run_ids: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)


@dataclass
class _Decision:
    state: str
    message: str
    batch_sizes: list[int] | None = None
    runs: list[tuple[str, RunSpec, int | None]] = field(default_factory=list)


def advance(
    engine: Engine, group_id: int, *, enqueue: Enqueue | None = None, celery_app: Any = None
) -> Settled | None:
    """Settle auto sweep ``group_id`` if it is waiting and its baseline runs are all final:
    queue the ladder (or record why not). None when there is nothing to do (not an auto
    sweep, already settled by another caller, a baseline still queued or running)."""
    decision = _decide(engine, group_id)
    if decision is None:
        return None
    with db.session(engine) as s:
        # The conditional UPDATE is the transaction's first statement (SQLite takes its
        # write lock here); the runs are created only by the caller that won it.
        if not runs.settle_auto(
            s,
            group_id,
            decision.state,
            message=decision.message,
            batch_sizes=decision.batch_sizes,
        ):
            return None
        ids = [
            runs.create_run(s, name=name, spec=_dump(spec), group_id=group_id, baseline_id=base).id
            for name, spec, base in decision.runs
        ]
    settled = Settled(group_id, decision.state, decision.message, ids)
    for run_id, (_, spec, _) in zip(ids, decision.runs, strict=True):
        if publish(engine, run_id, spec, enqueue, celery_app):  # else the reconciler's
            settled.sent.append(run_id)
    log.info("auto sweep %s: %s", group_id, decision.message)
    return settled


def after_run(engine: Engine, run_id: int, *, enqueue: Enqueue | None = None) -> Settled | None:
    """The worker's call after a run's final status: advance its auto sweep when the run
    is one of its baselines. Never raises (the reconciler retries)."""
    try:
        with db.session(engine) as s:
            run = runs.get_run(s, run_id)
            if run is None or not run.is_baseline or run.group_id is None:
                return None
            group = runs.get_group(s, run.group_id)
            if group is None or group.auto_state != runs.AUTO_WAITING:
                return None
            group_id = group.id
        return advance(engine, group_id, enqueue=enqueue)
    except Exception:
        log.warning("run %s: advancing its auto sweep failed", run_id, exc_info=True)
        return None


def advance_waiting(
    engine: Engine, *, enqueue: Enqueue | None = None, celery_app: Any = None
) -> list[Settled]:
    """Every waiting auto sweep whose baseline has finished (the reconciler's pass)."""
    with db.session(engine) as s:
        waiting = runs.waiting_auto_groups(s)
    done = []
    for group_id in waiting:
        try:
            settled = advance(engine, group_id, enqueue=enqueue, celery_app=celery_app)
        except Exception:
            log.warning("auto sweep %s: could not advance", group_id, exc_info=True)
            continue
        if settled is not None:
            done.append(settled)
    return done


def _decide(engine: Engine, group_id: int) -> _Decision | None:
    """Read the group and its baselines; what settling it would store (None: not yet)."""
    with db.session(engine) as s:
        group = runs.get_group(s, group_id)
        if group is None or group.auto_state != runs.AUTO_WAITING:
            return None
        bases = [r for r in group.runs if r.is_baseline]
        if any(r.status in ACTIVE_STATUSES for r in bases):
            return None
        if not bases:
            return _Decision(runs.AUTO_FAILED, "no baseline run is left: nothing queued")
        ok = [r for r in bases if r.status == RunStatus.SUCCEEDED]
        if not ok:
            ended = ", ".join(f"run {r.id} {r.status}" for r in bases)
            return _Decision(
                runs.AUTO_FAILED,
                f"the baseline did not succeed ({ended}): no noise scale to place the "
                "ladder around; nothing queued",
            )
        points, last = store_advice.noise_inputs(s, [r.id for r in ok])
        measured = advice.critical_batch(points, last)
        base_of = {int(r.spec.get("seed", 0)): r.id for r in ok}
        spec_dict, seeds = dict(group.spec or {}), list(group.seeds or [])
    if measured is None:
        return _Decision(runs.AUTO_FAILED, _why_unmeasured(points, last))
    try:
        spec = RunSpec.model_validate(spec_dict)
    except (ValidationError, ValueError) as exc:
        return _Decision(runs.AUTO_FAILED, f"the sweep's spec no longer validates: {exc}")
    # the seeds whose baseline succeeded
    seeds = [seed for seed in seeds or [spec.seed] if seed in base_of]
    plan = plan_ladder(spec, measured.median, seeds=seeds)
    assert plan.group is not None
    new = sorted({r.spec.total_batch for r in plan.runs})
    message = (
        f"ladder queued around the baseline's noise scale B = {measured.median:.4g} "
        f"(median of {measured.points} points, quartiles {measured.q25:.4g}-"
        f"{measured.q75:.4g}): kn = {', '.join(map(str, new)) or 'none'}"
        f" x seeds {', '.join(map(str, seeds))}"
    )
    if plan.errors:
        message += "; left out: " + "; ".join(e.message for e in plan.errors)
    return _Decision(
        runs.AUTO_QUEUED,
        message,
        plan.group.batch_sizes,
        [(r.name or default_name(r.spec), r.spec, base_of.get(r.spec.seed)) for r in plan.runs],
    )


def _why_unmeasured(points: dict[int, tuple[list[int], list[float]]], last: dict[int, int]) -> str:
    """Why the baseline gave no critical batch: no measurement at all, or none in the
    last half of its training (the trainer stores none while an EMA'd estimate is not
    positive: the noise of the small-batch gradient hides the true gradient's norm)."""
    key = store_advice.NOISE_KEY
    if not any(steps for steps, _ in points.values()):
        return f"the baseline logged no {key} (spec noise_every = 0?): nothing queued"
    seen = "; ".join(
        f"run {rid}: {len(steps)} points, the last at step {max(steps)} of {last.get(rid, '?')}"
        for rid, (steps, _) in sorted(points.items())
        if steps
    )
    return (
        f"the baseline logged no {key} in the last half of its training ({seen}): the "
        "noise-scale estimate was not positive there; nothing queued"
    )


def _dump(spec: RunSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
