"""Turning validated specs into stored, queued runs: single runs with a baseline, sweeps.

Shared by the REST routes and ``batchlab up --demo``. The rule is all or nothing: the
runs are committed first (so a worker that takes the message at once finds its run),
then queued; if the broker refuses a message, every run and group this request created
is deleted again and ``QueueUnavailable`` is raised, so a failed request leaves nothing
stored. A message already sent for a deleted run is harmless: the worker finds no run
and drops it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from server.deps import Context
from store import db
from store import runs as store_runs
from trainer.spec import RunSpec

log = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The broker could not take a message; nothing was stored."""


class BadBatchSize(ValueError):
    """A sweep batch size gives an invalid spec; ``index`` is its place in the list."""

    def __init__(self, index: int, total: int, error: ValidationError) -> None:
        first = error.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "spec"
        msg = str(first["msg"]).removeprefix("Value error, ")
        super().__init__(f"batch size {total} gives an invalid spec: {field}: {msg}")
        self.index = index
        self.total = total


def default_name(spec: RunSpec) -> str:
    """A name that says what differs between runs: "kn=1024 k=32 n=32 gradual"."""
    return f"kn={spec.total_batch} k={spec.workers} n={spec.batch_per_worker} {spec.warmup}"


def is_own_baseline(spec: RunSpec) -> bool:
    """A run at kn = ref_batch is its own reference (its LR is base_lr throughout)."""
    return spec.total_batch == spec.ref_batch


@dataclass
class _Planned:
    spec: RunSpec
    name: str
    is_baseline: bool
    # index into the plan of this run's baseline (None: no baseline)
    baseline_index: int | None = None


def submit_run(
    ctx: Context, spec: RunSpec, *, name: str | None = None, baseline: bool = False
) -> dict[str, Any]:
    """Store and queue one run, and with ``baseline`` its kn = ref_batch reference.

    Answer: ``{"run": Run, "baseline": Run | None, "group_id": int | None}``. A run that
    already is at kn = ref_batch gets no second copy: it is marked as a baseline itself.
    """
    name = (name or "").strip() or default_name(spec)
    plan: list[_Planned] = []
    group: dict[str, Any] | None = None
    if baseline and not is_own_baseline(spec):
        base_spec = spec.baseline()
        plan.append(_Planned(base_spec, f"baseline {default_name(base_spec)}", True))
        plan.append(_Planned(spec, name, False, baseline_index=0))
        group = {"name": f"{name[:185]} vs baseline", "kind": "compare", "spec": _dump(spec)}
    else:
        plan.append(_Planned(spec, name, baseline and is_own_baseline(spec)))
    runs, group_id = _store_and_queue(ctx, plan, group)
    if len(runs) == 2:
        return {"run": runs[1], "baseline": runs[0], "group_id": group_id}
    return {"run": runs[0], "baseline": None, "group_id": group_id}


def submit_compare(
    ctx: Context, specs: Sequence[tuple[str, RunSpec]], *, name: str
) -> dict[str, Any]:
    """Store and queue hand-picked runs as one "compare" group.

    The run at kn = ref_batch (if any) is the group's baseline and is queued first; the
    others point at it. Answer: ``{"group": Group, "runs": [Run]}``.
    """
    order = sorted(specs, key=lambda item: not is_own_baseline(item[1]))
    plan = [_Planned(spec, run_name, is_own_baseline(spec)) for run_name, spec in order]
    base = 0 if plan and plan[0].is_baseline else None
    for p in plan[1:]:
        p.baseline_index = base
    group = {"name": name, "kind": "compare", "spec": _dump(plan[0].spec)}
    runs, group_id = _store_and_queue(ctx, plan, group)
    with db.session(ctx.engine) as s:
        return {"group": store_runs.group_to_dict(store_runs.get_group(s, group_id)), "runs": runs}


def plan_sweep(
    spec: RunSpec, batch_sizes: Sequence[int], seeds: Sequence[int] | None, baseline: bool
) -> list[_Planned]:
    """One run per (batch size, seed), baselines first; raises ``BadBatchSize``."""
    seeds = list(seeds) if seeds else [spec.seed]
    sized: list[RunSpec] = []
    for i, kn in enumerate(batch_sizes):
        try:
            sized.append(spec.with_total_batch(kn))
        except ValidationError as err:
            raise BadBatchSize(i, kn, err) from err
    plan: list[_Planned] = []
    base_index: dict[int, int] = {}  # seed -> plan index of its baseline
    ref_in_list = any(is_own_baseline(s) for s in sized)
    for seed in seeds:
        if baseline and not ref_in_list:
            base = _with_seed(spec.baseline(), seed)
            base_index[seed] = len(plan)
            plan.append(_Planned(base, f"baseline {default_name(base)} seed={seed}", True))
    for s in sized:
        for seed in seeds:
            run_spec = _with_seed(s, seed)
            own = is_own_baseline(run_spec)
            if own:
                base_index[seed] = len(plan)
            plan.append(_Planned(run_spec, f"{default_name(run_spec)} seed={seed}", own))
    for p in plan:
        if not p.is_baseline:
            p.baseline_index = base_index.get(p.spec.seed)
    return plan


def submit_sweep(
    ctx: Context,
    spec: RunSpec,
    batch_sizes: Sequence[int],
    *,
    seeds: Sequence[int] | None = None,
    baseline: bool = True,
    name: str | None = None,
) -> dict[str, Any]:
    """Store and queue a sweep: ``{"sweep": Group, "runs": [Run]}``."""
    plan = plan_sweep(spec, batch_sizes, seeds, baseline)
    seed_list = list(seeds) if seeds else [spec.seed]
    name = (name or "").strip() or (
        f"sweep kn={','.join(str(b) for b in batch_sizes)} {spec.model} {spec.warmup}"
    )
    group = {
        "name": name,
        "kind": "sweep",
        "spec": _dump(spec),
        "batch_sizes": list(batch_sizes),
        "seeds": seed_list,
    }
    runs, group_id = _store_and_queue(ctx, plan, group)
    with db.session(ctx.engine) as s:
        sweep = store_runs.group_to_dict(store_runs.get_group(s, group_id))
    return {"sweep": sweep, "runs": runs}


def _store_and_queue(
    ctx: Context, plan: list[_Planned], group: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], int | None]:
    """Commit the planned runs (and group), then queue them; undo everything on failure."""
    with db.session(ctx.engine) as s:
        group_id = store_runs.create_group(s, **group).id if group else None
        ids: list[int] = []
        for p in plan:
            base_id = ids[p.baseline_index] if p.baseline_index is not None else None
            run = store_runs.create_run(
                s,
                name=p.name,
                spec=_dump(p.spec),
                group_id=group_id,
                baseline_id=base_id,
                is_baseline=p.is_baseline,
            )
            s.flush()  # assigns run.id, needed by the runs that point at this baseline
            ids.append(run.id)
    try:
        for run_id, p in zip(ids, plan, strict=True):
            ctx.enqueue(run_id, p.spec)
    except Exception as err:  # any failure to queue: the request did not happen
        log.warning("queueing runs %s failed, removing them: %s", ids, err)
        _undo(ctx, ids, group_id)
        raise QueueUnavailable(
            f"the task queue is unavailable ({ctx.settings.broker_url_safe}): "
            f"{type(err).__name__}: {err}"
        ) from err
    with db.session(ctx.engine) as s:
        return [store_runs.run_to_dict(store_runs.get_run(s, i)) for i in ids], group_id


def _undo(ctx: Context, run_ids: list[int], group_id: int | None) -> None:
    with db.session(ctx.engine) as s:
        for run_id in reversed(run_ids):  # runs pointing at a baseline go first
            store_runs.delete_run(s, run_id)
        if group_id is not None:
            group = store_runs.get_group(s, group_id)
            if group is not None:
                s.delete(group)


def _with_seed(spec: RunSpec, seed: int) -> RunSpec:
    return spec if spec.seed == seed else spec.model_copy(update={"seed": seed})


def _dump(spec: RunSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
