"""Storing and queueing a plan of runs (``trainer.plan``): single runs, sweeps, comparisons.

Shared by the REST routes and ``batchlab up --demo``. The rule is all or nothing: the
runs are committed first (so a worker that takes the message at once finds its run),
then queued; if the broker refuses a message, every run and group this request created
is deleted again and ``QueueUnavailable`` is raised, so a failed request leaves nothing
stored. A message already sent for a deleted run is harmless: the worker finds no run
and drops it.
"""

from __future__ import annotations

import logging
from typing import Any

from server.deps import Context
from server.schemas import GroupOut, RunCreated, RunOut, runs_out
from store import db
from store import runs as store_runs
from trainer.plan import Plan
from trainer.spec import RunSpec

log = logging.getLogger(__name__)


class QueueUnavailable(RuntimeError):
    """The broker could not take a message; nothing was stored."""


def submit_run(ctx: Context, plan: Plan) -> RunCreated:
    """Store and queue ``RunCreate.plan()``: the run, and its baseline first if any."""
    group, runs = submit(ctx, plan)
    return RunCreated(
        run=runs[-1],
        baseline=runs[0] if len(runs) == 2 else None,
        group_id=None if group is None else group.id,
    )


def submit(ctx: Context, plan: Plan) -> tuple[GroupOut | None, list[RunOut]]:
    """Commit the planned runs (and group), then queue them; undo everything on failure."""
    if plan.errors:
        raise ValueError(f"a plan with errors cannot be submitted: {plan.errors}")
    with db.session(ctx.engine) as s:
        group_id = None
        if (g := plan.group) is not None:
            group_id = store_runs.create_group(
                s,
                name=g.name,
                kind=g.kind,
                spec=_dump(g.spec),
                batch_sizes=g.batch_sizes,
                seeds=g.seeds,
                auto_state=store_runs.AUTO_WAITING if g.auto else None,
            ).id
        ids: list[int] = []
        for p in plan.runs:
            run = store_runs.create_run(
                s,
                name=p.name,
                spec=_dump(p.spec),
                group_id=group_id,
                baseline_id=None if p.baseline_index is None else ids[p.baseline_index],
                is_baseline=p.is_baseline,
            )
            s.flush()  # assigns run.id, needed by the runs that point at this baseline
            ids.append(run.id)
    try:
        for run_id, p in zip(ids, plan.runs, strict=True):
            ctx.enqueue(run_id, p.spec)
    except Exception as err:  # any failure to queue: the request did not happen
        log.warning("queueing runs %s failed, removing them: %s", ids, err)
        _undo(ctx, ids, group_id)
        raise QueueUnavailable(
            f"the task queue is unavailable ({ctx.settings.broker_url_safe}): "
            f"{type(err).__name__}: {err}"
        ) from err
    with db.session(ctx.engine) as s:
        runs = runs_out(s, [store_runs.get_run(s, i) for i in ids])
        group = store_runs.get_group(s, group_id) if group_id is not None else None
        return (None if group is None else GroupOut.model_validate(group)), runs


def _undo(ctx: Context, run_ids: list[int], group_id: int | None) -> None:
    with db.session(ctx.engine) as s:
        for run_id in reversed(run_ids):  # runs pointing at a baseline go first
            store_runs.delete_run(s, run_id)
        if group_id is not None:
            group = store_runs.get_group(s, group_id)
            if group is not None:
                s.delete(group)


def _dump(spec: RunSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json")
