"""Request bodies and answer shapes of the REST API (docs/api.md is the contract).

Request models embed ``trainer.spec.RunSpec`` as a field, so pydantic's error locations
flow through FastAPI unchanged: a bad ``batch_per_worker`` answers 422 with
``loc == ["body", "spec", "batch_per_worker"]``. Answer models are the serializers: built
from the store's rows (``from_attributes``) or the planner's, with ``derived`` computed and
non-finite numbers turned into null, and FastAPI writes them with pydantic's JSON encoder.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WithJsonSchema,
    computed_field,
    field_validator,
)
from sqlalchemy.orm import Session

from core.jsonsafe import finite_or_none, json_safe
from core.status import FINAL_STATUSES, RunStatus
from store import gang as store_gang
from store import runs as store_runs
from store.models import Run
from store.runs import iso
from trainer import advice
from trainer.plan import Plan, plan_auto_sweep, plan_run, plan_sweep
from trainer.spec import MAX_SEED, PlainText, RunSpec
from worker.celery_app import WORKER_STALE_S, has_gpu_queue, queue_for, waiting_reason

XAxis = Literal["step", "epoch", "wall_time"]

# One sweep may not flood the queue by accident (a typo such as seeds 0..999).
MAX_SWEEP_RUNS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunCreate(_Body):
    """POST /api/runs."""

    name: PlainText | None = Field(
        None,
        max_length=200,
        description='Shown in lists; default like "kn=1024 k=32 n=32 gradual".',
    )
    spec: RunSpec
    baseline: bool = Field(
        False,
        description="Also queue spec.baseline() (kn = ref_batch) and group both for comparison.",
    )

    def plan(self) -> Plan:
        return plan_run(self.spec, name=self.name, baseline=self.baseline)


AUTO = "auto"
_MAX_SIZES = 64
# batch_sizes is a list or the string "auto". Validated as the list (a wrap validator lets
# "auto" through first), so a bad size's error is at ["body", "batch_sizes", i] and not
# under a union member's tag; the OpenAPI document shows both forms.
_SIZES_SCHEMA = {
    "anyOf": [
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
            "maxItems": _MAX_SIZES,
        },
        {"type": "string", "enum": [AUTO]},
    ],
    "title": "Batch Sizes",
    "description": 'Total minibatch sizes kn to run, or "auto": the baseline first, then '
    "powers of two from B/8 to 8B around its measured gradient noise scale B.",
}


class SweepCreate(_Body):
    """POST /api/sweeps: one run per (batch size, seed), plus the baseline."""

    name: PlainText | None = Field(None, max_length=200)
    spec: RunSpec
    batch_sizes: Annotated[list[Annotated[int, Field(ge=1)]], WithJsonSchema(_SIZES_SCHEMA)] = (
        Field(..., min_length=1, max_length=_MAX_SIZES)
    )
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] | None = Field(
        None, min_length=1, max_length=32, description="Default: [spec.seed]."
    )
    baseline: bool = Field(True, description="Add kn = ref_batch when it is not in the list.")

    @field_validator("batch_sizes", mode="wrap")
    @classmethod
    def _auto(cls, v: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        if v != AUTO:
            return handler(v)
        spec = info.data.get("spec")
        if spec is not None and spec.noise_every == 0:
            raise ValueError(
                '"auto" places the sizes around the baseline\'s measured noise scale: '
                "it needs spec.noise_every > 0"
            )
        return AUTO

    @field_validator("batch_sizes", "seeds")
    @classmethod
    def _unique(cls, v: list[int] | str | None, info: ValidationInfo) -> list[int] | str | None:
        dups = sorted({x for x in v or [] if v.count(x) > 1}) if isinstance(v, list) else []
        if dups:
            raise ValueError(f"{str(info.field_name).replace('_', ' ')} repeat: {dups}")
        return v

    @field_validator("seeds")
    @classmethod
    def _few_enough(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        sizes = info.data.get("batch_sizes")
        # "auto": the baseline and at most 7 ladder sizes per seed, within the bound
        count = 1 + 2 * advice.LADDER_SPAN + 1 if sizes == AUTO else len(sizes or [])
        if v and count * len(v) > MAX_SWEEP_RUNS:
            raise ValueError(
                f"{count} batch sizes x {len(v)} seeds = {count * len(v)} runs, "
                f"more than the {MAX_SWEEP_RUNS} one sweep may queue"
            )
        return v

    @field_validator("baseline")
    @classmethod
    def _auto_needs_baseline(cls, v: bool, info: ValidationInfo) -> bool:
        if not v and info.data.get("batch_sizes") == AUTO:
            raise ValueError('batch_sizes "auto" is planned around the baseline: keep it')
        return v

    @property
    def auto(self) -> bool:
        return self.batch_sizes == AUTO

    def plan(self) -> Plan:
        if self.auto:
            return plan_auto_sweep(self.spec, seeds=self.seeds, name=self.name)
        return plan_sweep(
            self.spec, self.batch_sizes, seeds=self.seeds, baseline=self.baseline, name=self.name
        )


# --- answers: the only serializers of the store's rows (built from their attributes) -----
IsoTime = Annotated[str | None, BeforeValidator(lambda v: iso(v) if isinstance(v, datetime) else v)]
# JSON has no NaN or Infinity, and a diverged run logs both: they answer null.
Finite = Annotated[float | None, BeforeValidator(finite_or_none)]
FiniteInt = Annotated[int | None, BeforeValidator(finite_or_none)]
JsonDict = Annotated[dict[str, Any], AfterValidator(json_safe)]


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class NodeOut(BaseModel):
    """One node of a multi-node run's gang (``store.gang.node_to_dict``)."""

    run_id: int
    attempt: int
    slot: int = Field(description="0 hosts the rendezvous; not the training rank.")
    worker: str
    host: str
    addr: str
    endpoint: str | None = Field(None, description="addr:port of the rendezvous (slot 0).")
    state: Literal["waiting", "running", "exited", "failed"]
    joined_at: str | None = None
    beat_at: str | None = None
    error: str | None = None


class RunOut(_Out):
    """The Run object of docs/api.md, from a ``store.models.Run``."""

    id: int
    name: str
    status: RunStatus
    spec: JsonDict
    created_at: IsoTime = None
    started_at: IsoTime = None
    finished_at: IsoTime = None
    heartbeat_at: IsoTime = None
    progress: Finite = None
    eta_s: Finite = None
    host: str | None = None
    gpus: str | None = None
    worker: str | None = None
    device: str | None = Field(None, description="What the last attempt trained on.")
    queue: str | None = Field(None, description="The Celery queue of its last message.")
    waiting_for: str | None = Field(
        None,
        description="Why a queued run is not taken (no live worker serves its queue); "
        "null when one does or the run is not queued. Set by runs_out.",
    )
    attempts: int = 0
    cancel_requested: bool = False
    error: str | None = None
    diverged_step: int | None = None
    summary: JsonDict | None = None
    group_id: int | None = None
    baseline_id: int | None = None
    is_baseline: bool = False
    tags: Annotated[list[str], BeforeValidator(lambda v: v or [])] = []
    notes: Annotated[str, BeforeValidator(lambda v: v or "")] = ""
    archived: bool = False
    parent_id: int | None = Field(None, description="The run this one extends.")
    origin: Literal["worker", "external"] = Field(
        "worker",
        description="worker: queued and trained by a batchlab worker; external: registered "
        "by its own client (batchlab train --server, Client.start_run).",
    )
    nodes: int = Field(1, description="Machines the run spans (spec.nodes).")
    gang: list[NodeOut] = Field(
        default_factory=list,
        description="A multi-node run's nodes of its latest attempt (while queued: the "
        "gang forming). Set by runs_out.",
    )

    @computed_field
    @property
    def derived(self) -> dict[str, Any]:
        """``RunSpec.summary_dict()`` of the stored spec; {} when it no longer validates
        (a spec written by an older version: the run must still list)."""
        try:
            return RunSpec.model_validate(self.spec).summary_dict()
        except (ValidationError, ValueError, TypeError):
            return {}


def runs_out(s: Session, rows: Sequence[Run]) -> list[RunOut]:
    """``RunOut`` of each row with ``waiting_for`` filled in: one query of the live
    workers' queues for all of them (none when no row is queued)."""
    queued = any(r.status == RunStatus.QUEUED for r in rows)
    live = store_runs.live_workers_per_queue(s, seen_within_s=WORKER_STALE_S) if queued else {}
    nodes = store_gang.nodes_of(s, [r.id for r in rows if (r.nodes or 1) > 1])
    outs = []
    for row in rows:
        out = RunOut.model_validate(row)
        gang = nodes.get(row.id, [])
        out.gang = [NodeOut(**store_gang.node_to_dict(n)) for n in gang]
        out.waiting_for = waiting_reason(row.status, row.queue, live) or (
            store_gang.waiting_reason(row, gang, live_workers=live.get(row.queue or ""))
        )
        outs.append(out)
    return outs


# --- run management (server/routes_manage.py); the rules live in store.runs ------------
RunName = Annotated[str, AfterValidator(store_runs.clean_name)]
Tags = Annotated[list[str], AfterValidator(store_runs.clean_tags)]
Notes = Annotated[str, AfterValidator(store_runs.clean_notes)]


class RunPatch(_Body):
    """PATCH /api/runs/{id}: the fields given change, the others stay."""

    name: RunName | None = Field(None, description="At most 200 characters.")
    tags: Tags | None = Field(
        None,
        description=f"Replaces the run's tags: at most {store_runs.MAX_TAGS}, each "
        f"1-{store_runs.TAG_MAX_LEN} characters.",
    )
    notes: Notes | None = Field(None, description="At most 10,000 characters.")
    archived: bool | None = Field(None, description="Archived runs are hidden from lists.")


class BulkAction(_Body):
    """POST /api/runs/bulk."""

    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] = Field(..., min_length=1, max_length=1000)
    action: Literal["archive", "unarchive", "delete", "tag", "untag"]
    tags: Tags | None = Field(None, description="The tags to add or remove (tag, untag).")

    @field_validator("tags")
    @classmethod
    def _some(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("give at least one tag")
        return v


class BulkDone(BaseModel):
    done: list[int] = Field(description="Runs the action applied to.")
    missing: list[int] = Field(description="Ids that name no run.")


class ExtendBody(_Body):
    """POST /api/runs/{id}/extend."""

    epochs: int = Field(..., ge=1, description="Epochs to train beyond the parent's.")


class RunCreated(_Out):
    run: RunOut
    baseline: RunOut | None
    group_id: int | None


class _RunRef(_Out):
    id: int
    is_baseline: bool
    baseline_id: int | None = None


class GroupOut(_Out):
    """The Group object of docs/api.md, from a ``store.models.Group`` and its runs."""

    id: int
    name: str
    kind: Literal["sweep", "compare"]
    created_at: IsoTime = None
    spec: JsonDict | None = None
    batch_sizes: list[int] | None = None
    seeds: list[int] | None = None
    auto_state: store_runs.AutoState | None = Field(
        None,
        description='A sweep of batch_sizes "auto": waiting for the baseline\'s noise scale, '
        "then ladder_queued or no_ladder (nothing queued); null for other groups.",
    )
    auto_message: str | None = Field(None, description="What the auto sweep did or waits for.")
    runs: list[_RunRef] = Field([], exclude=True)

    @computed_field
    @property
    def baseline_id(self) -> int | None:
        """The run marked as baseline, else the one the group's runs point at."""
        own = next((r.id for r in self.runs if r.is_baseline), None)
        pointed = (r.baseline_id for r in self.runs if r.baseline_id is not None)
        return own if own is not None else next(pointed, None)

    @computed_field
    @property
    def run_ids(self) -> list[int]:
        return [r.id for r in self.runs]


class SweepCreated(_Out):
    sweep: GroupOut
    runs: list[RunOut]


class SummaryRow(_Out):
    """One row of a sweep's table; the values after ``is_baseline`` are the run's summary."""

    run_id: int
    total_batch: int
    workers: int
    batch_per_worker: int
    seed: int
    peak_lr: float
    status: RunStatus
    is_baseline: bool
    final_val_err: Finite = None
    best_val_err: Finite = None
    median_last5_val_err: Finite = None
    iters_to_target: FiniteInt = None
    time_to_target_s: Finite = None
    epochs_to_target: Finite = None
    loss_oscillation: Finite = None
    samples_per_s: Finite = None
    wall_time_s: Finite = None

    @classmethod
    def of(cls, run: RunOut) -> SummaryRow:
        spec, derived = run.spec, run.derived
        workers, n = int(spec.get("workers", 1)), int(spec.get("batch_per_worker", 0))
        return cls.model_validate(
            {
                **(run.summary or {}),
                "run_id": run.id,
                "total_batch": derived.get("total_batch", workers * n),
                "workers": workers,
                "batch_per_worker": n,
                "seed": int(spec.get("seed", 0)),
                # a stored spec that no longer validates: best effort
                "peak_lr": derived.get("peak_lr", float(spec.get("base_lr", 0.0))),
                "status": run.status,
                "is_baseline": run.is_baseline,
            }
        )


class CriticalBatchOut(BaseModel):
    """The baseline runs' gradient noise scale B_simple over the last half of training."""

    median: float
    q25: float
    q75: float
    points: int = Field(description="Measurements pooled over the baseline's seeds.")
    run_ids: list[int] = Field(description="The baseline runs they come from.")


class KneeOut(BaseModel):
    """The smallest kn whose final error is past the baseline's (``rule`` says how)."""

    batch_size: int | None = Field(description="null: no finished kn is past it (yet).")
    baseline_mean: float
    baseline_std: float
    threshold: float
    metric: Literal["val_err"] = "val_err"
    rule: str


class SweepAdvice(BaseModel):
    """``trainer.advice`` on a sweep: each part null until it can be computed."""

    critical_batch: CriticalBatchOut | None = None
    knee: KneeOut | None = None


class SweepDetail(_Out):
    sweep: GroupOut
    runs: list[RunOut]
    baseline_id: int | None
    summary: list[SummaryRow]
    advice: SweepAdvice | None = Field(
        None, description="null until the critical batch or the knee can be computed."
    )


class PlannedRunOut(_Out):
    """A run a request would create (``trainer.plan.PlannedRun``)."""

    name: str
    spec: RunSpec
    is_baseline: bool
    baseline_index: int | None = Field(description="Index in `runs` of this run's baseline.")
    queue: str | None = Field(None, description="The queue it would be sent to now.")

    @computed_field
    @property
    def derived(self) -> dict[str, Any]:
        return self.spec.summary_dict()


class PlanOut(_Out):
    runs: list[PlannedRunOut] = Field(description="Baselines first, in the order of creation.")
    errors: list[dict[str, Any]] = Field(
        description="Batch sizes left out, as 422 items: submitting this body answers 422."
    )
    warnings: list[str]

    @classmethod
    def of(cls, plan: Plan, live_queues: Mapping[str, int] | None = None) -> PlanOut:
        """With ``live_queues`` (how many live workers consume each queue), each run names
        the queue it would go to, and a queue nobody serves, or fewer workers than a
        multi-node run needs, adds a warning."""
        errors = [
            {
                "type": "value_error",
                "loc": ("body", "batch_sizes", e.index),
                "msg": e.message,
                "input": e.total,
            }
            for e in plan.errors
        ]
        out = cls(runs=plan.runs, errors=errors, warnings=plan.warnings)
        if live_queues is not None:
            gpus = has_gpu_queue(live_queues)
            for run in out.runs:
                run.queue = queue_for(run.spec, have_gpus=gpus)
            for queue in dict.fromkeys(r.queue for r in out.runs if r.queue not in live_queues):
                out.warnings.append(
                    f"no live worker serves queue {queue}: the run waits until one starts "
                    f"({_start_hint(queue)})"
                )
            for run in out.runs:
                live = live_queues.get(run.queue or "", 0)
                if 0 < live < run.spec.nodes:
                    serve = "worker serves" if live == 1 else "workers serve"
                    out.warnings.append(
                        f"nodes={run.spec.nodes}: only {live} live {serve} queue {run.queue}; "
                        f"the run waits until {run.spec.nodes} do (start "
                        f"`{_start_hint(run.queue)}` on more machines, docs/deploy.md)"
                    )
                    break
        return out


def _start_hint(queue: str | None) -> str:
    """The command that starts a worker for ``queue`` (cpu, gpu, gpuN)."""
    if queue == "gpu":
        return "batchlab worker --gpus all"
    if queue and queue.startswith("gpu") and queue[3:].isdigit():
        return f"batchlab worker --gpus {','.join(map(str, range(int(queue[3:]))))} --group"
    return "batchlab worker --gpus none"


_TRIMMED = "Absent when the request's `columns` leaves it out."


class Series(BaseModel):
    """One metric of one run, downsampled; non-finite values are null. A request with
    ``columns=`` gets only those of the four lists (the compare view asks for two)."""

    step: list[int] | None = Field(None, description=_TRIMMED)
    epoch: list[float | None] | None = Field(None, description=_TRIMMED)
    wall_time: list[float | None] | None = Field(None, description=_TRIMMED)
    value: list[float | None] | None = Field(None, description=_TRIMMED)
    total: int = Field(description="Points stored before downsampling.")


class RunMetrics(BaseModel):
    run_id: int
    series: dict[str, Series]


class RunKeys(BaseModel):
    run_id: int
    keys: list[str] = Field(description="The run's distinct metric keys, sorted.")


class BatchMetrics(BaseModel):
    runs: dict[str, dict[str, Series]]
    missing: list[int] = Field([], description="Requested run ids that do not exist.")


class SchedulePreview(BaseModel):
    iters_per_epoch: int
    total_iters: int
    warmup_iters: int
    total_batch: int
    peak_lr: float
    step: list[int]
    epoch: list[float]
    lr: list[float]


class WorkerOut(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    host: str | None = None
    gpus: str | None = None
    queues: list[str] | str | None = None
    active: int | None = None
    last_seen: str | None = None
    alive: bool = True
    node: NodeOut | None = Field(
        None, description="The slot of a multi-node run this worker holds (waiting or running)."
    )


class WorkersOut(BaseModel):
    workers: list[WorkerOut]
    queues: dict[str, int] = Field(description="Queued runs waiting per Celery queue.")


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "error"]
    database: str
    broker: str
    version: str
    auth: bool = Field(description="True when writes need a Bearer token.")
    queued_runs: int | None = Field(None, description="Runs queued in the database.")
    broker_messages: int | None = Field(
        None,
        description="Messages waiting in the broker's queues: fewer than queued_runs means "
        "lost messages, re-sent after BATCHLAB_RESEND_AFTER_S.",
    )
    reconcile: dict[str, Any] | None = Field(
        None, description="The API's last pass over queued runs against the broker's messages."
    )


# --- externally launched runs (server/routes_external.py; store.runs owns the rules) ----
_UID = r"^[0-9a-f]{32}$"
# Checked once per distinct key of an upload (server.routes_external.to_rows), not per
# point: the schema documents the rule.
MetricKey = Annotated[
    str, WithJsonSchema({"type": "string", "pattern": r"^[A-Za-z0-9_.:/-]{1,64}$"})
]
# [step, epoch, wall_time, {key: value}]: value null is NaN (JSON has none); NaN and
# Infinity literals are accepted too.
PointRecord = tuple[
    Annotated[StrictInt, Field(ge=0, le=2**63 - 1)],
    Annotated[StrictFloat, Field(allow_inf_nan=False)],
    Annotated[StrictFloat, Field(allow_inf_nan=False)],
    Annotated[dict[MetricKey, StrictFloat | None], Field(max_length=256)],
]


class ExternalRunCreate(_Body):
    """POST /api/external/runs: a run trained by its own client, running from the start."""

    uid: str | None = Field(
        None,
        pattern=_UID,
        description="The client's id for the run (uuid4 hex): registering it again answers "
        "the same run, so a retried request never makes two.",
    )
    name: PlainText = Field("external run", min_length=1, max_length=200)
    spec: RunSpec | None = Field(None, description="A RunSpec: the run pairs and compares as any.")
    params: dict[str, Any] | None = Field(
        None, description="Free-form parameters, for a run that is not a RunSpec."
    )
    tags: Tags = []
    host: PlainText = Field("", max_length=200)
    device: PlainText | None = Field(None, max_length=300)
    group_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    baseline_id: Annotated[int, Field(ge=1, le=2**63 - 1)] | None = None
    is_baseline: bool = False

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if v is not None and info.data.get("spec") is not None:
            raise ValueError("give spec or params, not both")
        return json_safe(v) if v is not None else None

    def stored_spec(self) -> dict[str, Any]:
        if self.spec is not None:
            return self.spec.model_dump(mode="json")
        return dict(self.params or {})


class ExternalRunRegistered(BaseModel):
    run: RunOut
    created: bool = Field(description="False: this uid was registered before.")
    max_body_bytes: int = Field(description="The largest points upload (after gzip) taken.")
    heartbeat_s: float = Field(description="How often the client should call .../heartbeat.")
    silent_after_s: float = Field(description="Silent this long, the run is failed.")


class PointsUpload(_Body):
    """POST /api/external/runs/{id}/points: body JSON, optionally gzip-compressed."""

    records: list[PointRecord] = Field(
        ...,
        description="[step, epoch, wall_time, {key: value}] each; a (key, step) sent again "
        "is stored once (the last value wins).",
    )


class PointsStored(BaseModel):
    points: int = Field(description="Points of this upload, now committed.")


class ExternalBeat(_Body):
    """POST /api/external/runs/{id}/heartbeat: all fields optional."""

    progress: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    eta_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    device: PlainText | None = Field(None, max_length=300)


class ExternalBeatOut(BaseModel):
    status: RunStatus
    cancel_requested: bool
    stop: bool = Field(description="Stop training: cancel requested, or the run is final.")


class ExternalFinish(_Body):
    """POST /api/external/runs/{id}/finish."""

    status: RunStatus = Field(description="A final status: succeeded, failed, cancelled, diverged.")
    summary: dict[str, Any] | None = None
    error: PlainText | None = Field(None, max_length=10_000)
    diverged_step: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None

    @field_validator("status")
    @classmethod
    def _final(cls, value: RunStatus) -> RunStatus:
        if value not in FINAL_STATUSES:
            raise ValueError(f"must be a final status ({', '.join(sorted(FINAL_STATUSES))})")
        return value


class ExternalFinished(BaseModel):
    run: RunOut
    applied: bool = Field(description="False: the run was final already (see run.status).")
