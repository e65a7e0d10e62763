"""Which runs a request creates: one run (with its baseline), a comparison, a batch-size sweep.

Pure and torch-free: the API stores and queues a plan (server/submit.py), previews it
without storing (POST /api/plan/run, /api/plan/sweep: the New run form draws it), and
``batchlab up --demo`` queues its comparison through ``plan_compare``. Baselines come
first in a plan, so a run's ``baseline_index`` always points backwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from core.errors import format_validation_error
from trainer import advice
from trainer.spec import RunSpec

# A sweep size that leaves more than this share of each epoch unused is worth a warning.
DROPPED_WARN_FRACTION = 0.1


@dataclass
class PlannedRun:
    spec: RunSpec
    name: str
    is_baseline: bool
    # index into Plan.runs of this run's baseline (None: no baseline)
    baseline_index: int | None = None


@dataclass
class PlannedGroup:
    name: str
    kind: str  # "sweep" | "compare"
    spec: RunSpec
    batch_sizes: list[int] | None = None
    seeds: list[int] | None = None
    # batch_sizes "auto": only the baselines now, the ladder once they finish
    # (worker.auto_sweep through plan_ladder)
    auto: bool = False


@dataclass
class SizeError:
    """A sweep batch size that gives an invalid spec; ``index`` is its place in the list."""

    index: int
    total: int
    message: str


@dataclass
class Plan:
    runs: list[PlannedRun]
    group: PlannedGroup | None = None
    errors: list[SizeError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        """The notes, then each total batch that leaves much of every epoch unused."""
        out = list(self.notes)
        for spec in {r.spec.total_batch: r.spec for r in self.runs}.values():
            n, kn = spec.train_size, spec.total_batch
            if n and n % kn > DROPPED_WARN_FRACTION * n:
                out.append(
                    f"kn={kn} uses {n - n % kn} of {n} training samples per epoch "
                    f"({(n - n % kn) / n:.0%}): the last partial minibatch is dropped"
                )
        return out


def default_name(spec: RunSpec) -> str:
    """A name that says what differs between runs: "kn=1024 k=32 n=32 gradual"."""
    return f"kn={spec.total_batch} k={spec.workers} n={spec.batch_per_worker} {spec.warmup}"


def is_own_baseline(spec: RunSpec) -> bool:
    """A run at kn = ref_batch is its own reference (its LR is base_lr throughout)."""
    return spec.total_batch == spec.ref_batch


def plan_run(spec: RunSpec, *, name: str | None = None, baseline: bool = False) -> Plan:
    """One run, and with ``baseline`` its kn = ref_batch reference first (both in a compare
    group). A run already at kn = ref_batch gets no copy: it is marked a baseline itself."""
    name = (name or "").strip() or default_name(spec)
    if not baseline or is_own_baseline(spec):
        notes = ["kn = ref_batch: this run is its own baseline"] if baseline else []
        return Plan([PlannedRun(spec, name, baseline)], notes=notes)
    base = spec.baseline()
    runs = [
        PlannedRun(base, f"baseline {default_name(base)}", True),
        PlannedRun(spec, name, False, baseline_index=0),
    ]
    return Plan(runs, PlannedGroup(f"{name[:185]} vs baseline", "compare", spec))


def plan_compare(specs: Sequence[tuple[str, RunSpec]], *, name: str) -> Plan:
    """Hand-picked runs as one compare group; the one at kn = ref_batch (if any) goes
    first and is the baseline of the others."""
    order = sorted(specs, key=lambda item: not is_own_baseline(item[1]))
    runs = [PlannedRun(spec, run_name, is_own_baseline(spec)) for run_name, spec in order]
    base = 0 if runs and runs[0].is_baseline else None
    for r in runs[1:]:
        r.baseline_index = base
    return Plan(runs, PlannedGroup(name, "compare", runs[0].spec))


def plan_sweep(
    spec: RunSpec,
    batch_sizes: Sequence[int],
    *,
    seeds: Sequence[int] | None = None,
    baseline: bool = True,
    name: str | None = None,
) -> Plan:
    """One run per (batch size, seed) through ``spec.with_total_batch``, and one kn =
    ref_batch baseline per seed unless a size already is ref_batch. Sizes that give an
    invalid spec are left out and listed in ``errors``."""
    seeds = list(seeds) if seeds else [spec.seed]
    sized: list[RunSpec] = []
    errors: list[SizeError] = []
    for i, kn in enumerate(batch_sizes):
        try:
            sized.append(spec.with_total_batch(kn))
        except ValidationError as err:
            first = format_validation_error(err.errors()[:1])
            errors.append(SizeError(i, kn, f"batch size {kn} gives an invalid spec: {first}"))
    runs: list[PlannedRun] = []
    base_index: dict[int, int] = {}  # seed -> index of its baseline
    if baseline and not any(is_own_baseline(s) for s in sized):
        for seed in seeds:
            base = _with_seed(spec.baseline(), seed)
            base_index[seed] = len(runs)
            runs.append(PlannedRun(base, f"baseline {default_name(base)} seed={seed}", True))
    for s in sized:
        for seed in seeds:
            run_spec = _with_seed(s, seed)
            own = is_own_baseline(run_spec)
            if own:
                base_index[seed] = len(runs)
            runs.append(PlannedRun(run_spec, f"{default_name(run_spec)} seed={seed}", own))
    for r in runs:
        if not r.is_baseline:
            r.baseline_index = base_index.get(r.spec.seed)
    name = (name or "").strip() or (
        f"sweep kn={','.join(str(b) for b in batch_sizes)} {spec.model} {spec.warmup}"
    )
    group = PlannedGroup(name, "sweep", spec, list(batch_sizes), seeds)
    return Plan(runs, group, errors)


def _with_seed(spec: RunSpec, seed: int) -> RunSpec:
    return spec if spec.seed == seed else spec.model_copy(update={"seed": seed})


def plan_auto_sweep(
    spec: RunSpec, *, seeds: Sequence[int] | None = None, name: str | None = None
) -> Plan:
    """``batch_sizes: "auto"``: the kn = ref_batch baseline per seed now; once they have
    finished, ``plan_ladder`` places the other sizes around their measured noise scale."""
    seeds = list(seeds) if seeds else [spec.seed]
    base = spec.baseline()
    runs = [
        PlannedRun(_with_seed(base, seed), f"baseline {default_name(base)} seed={seed}", True)
        for seed in seeds
    ]
    name = (name or "").strip() or f"sweep kn=auto {spec.model} {spec.warmup}"
    top = f", at most {spec.train_size} (the training set)" if spec.train_size else ""
    note = (
        f"batch sizes auto: only the baseline (kn={base.total_batch}) is queued now; when it "
        "has finished, one run per seed at each power of two from B/8 to 8B around its "
        f"measured gradient noise scale B (median of noise_scale over its last half; at "
        f"least {advice.LADDER_MIN_BATCH}{top}) is queued"
    )
    group = PlannedGroup(name, "sweep", spec, [base.total_batch], seeds, auto=True)
    return Plan(runs, group, notes=[note])


def plan_ladder(spec: RunSpec, b_simple: float, *, seeds: Sequence[int]) -> Plan:
    """The runs an auto sweep adds around the critical batch ``b_simple``
    (``trainer.advice.ladder``), without the baseline's kn, which has run already.
    ``group.batch_sizes`` lists every size of the sweep (the baseline's too); sizes that
    give an invalid spec are left out and listed in ``errors``."""
    base_kn = spec.baseline().total_batch
    sizes = advice.ladder(b_simple, base_kn, max_batch=spec.train_size)
    extra = [kn for kn in sizes if kn != base_kn]
    plan = plan_sweep(spec, extra, seeds=seeds, baseline=False)
    refused = {e.total for e in plan.errors}
    assert plan.group is not None
    plan.group.batch_sizes = [kn for kn in sizes if kn not in refused]
    return plan
