"""Request bodies and answer shapes of the REST API (docs/api.md is the contract).

Request models embed ``trainer.spec.RunSpec`` as a field, so pydantic's error locations
flow through FastAPI unchanged: a bad ``batch_per_worker`` answers 422 with
``loc == ["body", "spec", "batch_per_worker"]``. Answer models exist for the OpenAPI page
and accept extra keys, so a field the store adds later is passed on, not dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from trainer.spec import RunSpec

RunStatus = Literal["queued", "running", "succeeded", "failed", "diverged", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "diverged", "cancelled"})
XAxis = Literal["step", "epoch", "wall_time"]

# One sweep may not flood the queue by accident (a typo such as seeds 0..999).
MAX_SWEEP_RUNS = 256


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunCreate(_Body):
    """POST /api/runs."""

    name: str | None = Field(
        None,
        max_length=200,
        description='Shown in lists; default like "kn=1024 k=32 n=32 gradual".',
    )
    spec: RunSpec
    baseline: bool = Field(
        False,
        description="Also queue spec.baseline() (kn = ref_batch) and group both for comparison.",
    )


class SweepCreate(_Body):
    """POST /api/sweeps: one run per (batch size, seed), plus the baseline."""

    name: str | None = Field(None, max_length=200)
    spec: RunSpec
    batch_sizes: list[Annotated[int, Field(ge=1)]] = Field(
        ..., min_length=1, max_length=64, description="Total minibatch sizes kn to run."
    )
    seeds: list[Annotated[int, Field(ge=0)]] | None = Field(
        None, min_length=1, max_length=32, description="Default: [spec.seed]."
    )
    baseline: bool = Field(True, description="Add kn = ref_batch when it is not in the list.")

    @field_validator("batch_sizes")
    @classmethod
    def _unique_sizes(cls, v: list[int]) -> list[int]:
        dups = sorted({b for b in v if v.count(b) > 1})
        if dups:
            raise ValueError(f"batch sizes repeat: {dups}")
        return v

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int] | None, info: ValidationInfo) -> list[int] | None:
        if v is None:
            return v
        dups = sorted({s for s in v if v.count(s) > 1})
        if dups:
            raise ValueError(f"seeds repeat: {dups}")
        sizes = info.data.get("batch_sizes")
        if sizes and len(sizes) * len(v) > MAX_SWEEP_RUNS:
            raise ValueError(
                f"{len(sizes)} batch sizes x {len(v)} seeds = {len(sizes) * len(v)} runs, "
                f"more than the {MAX_SWEEP_RUNS} one sweep may queue"
            )
        return v


# --- answers (OpenAPI documentation) -----------------------------------------------------
class _Out(BaseModel):
    model_config = ConfigDict(extra="allow")


class RunOut(_Out):
    id: int
    name: str
    status: RunStatus
    spec: dict[str, Any]
    derived: dict[str, Any] = {}
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    progress: float | None = None
    eta_s: float | None = None
    host: str | None = None
    gpus: str | None = None
    worker: str | None = None
    error: str | None = None
    diverged_step: int | None = None
    summary: dict[str, Any] | None = None
    group_id: int | None = None
    baseline_id: int | None = None
    is_baseline: bool = False


class RunCreated(_Out):
    run: RunOut
    baseline: RunOut | None
    group_id: int | None


class GroupOut(_Out):
    id: int
    name: str
    kind: Literal["sweep", "compare"]
    created_at: str | None = None
    spec: dict[str, Any] | None = None
    batch_sizes: list[int] | None = None
    seeds: list[int] | None = None
    baseline_id: int | None = None
    run_ids: list[int] = []


class SweepCreated(_Out):
    sweep: GroupOut
    runs: list[RunOut]


class SummaryRow(_Out):
    run_id: int
    total_batch: int
    workers: int
    batch_per_worker: int
    seed: int
    peak_lr: float
    status: RunStatus
    is_baseline: bool
    final_val_err: float | None = None
    best_val_err: float | None = None
    median_last5_val_err: float | None = None
    iters_to_target: int | None = None
    time_to_target_s: float | None = None
    epochs_to_target: float | None = None
    loss_oscillation: float | None = None
    samples_per_s: float | None = None
    wall_time_s: float | None = None


class SweepDetail(_Out):
    sweep: GroupOut
    runs: list[RunOut]
    baseline_id: int | None
    summary: list[SummaryRow]


class Series(BaseModel):
    """One metric of one run, downsampled; non-finite values are null."""

    step: list[int]
    epoch: list[float | None]
    wall_time: list[float | None]
    value: list[float | None]
    total: int = Field(description="Points stored before downsampling.")


class RunMetrics(BaseModel):
    run_id: int
    series: dict[str, Series]


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


class WorkerOut(_Out):
    name: str
    host: str | None = None
    gpus: str | None = None
    queues: list[str] | str | None = None
    active: int | None = None
    last_seen: str | None = None
    alive: bool = True


class WorkersOut(BaseModel):
    workers: list[WorkerOut]
    queues: dict[str, int] = Field(description="Queued runs waiting per Celery queue.")


class HealthOut(BaseModel):
    status: Literal["ok", "degraded", "error"]
    database: str
    broker: str
    version: str
    auth: bool = Field(description="True when writes need a Bearer token.")
