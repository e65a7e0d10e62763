"""Past SGD's knee with LARS and LAMB (issue 13, part 4): does layer-wise adaptation move it?

The data and schedule of the issue's measurement (and of docs/fig3.md): MNIST-1D CNN with
per-worker BN (n = 32), 32,768 training samples (``dataset_size: 40960``, 80% train),
gradual warmup over 5 epochs, step decay at the paper's 30/60/80 of 90 epochs scaled to
the run's length, weight decay 1e-4, momentum 0.9. kn = k x 32 with k virtual workers.

Optimizers (docs/lars.md says why these LRs):

- ``sgd``: momentum SGD, linear scaling from eta = 0.05 at kn = 32 (as the issue).
- ``lars``: pytorch-optimizer's LARS with the paper's trust coefficient eta = 1e-3 and
  the linear rule, the LR being ``--lars-mult`` times SGD's (default 4, from ``search``).
- ``lamb``: pytorch-optimizer's Lamb with square-root scaling, ``--lamb-lr`` (default
  0.08, from ``search``) being its LR at kn = 4096; referenced to kn = 32 so that the
  gradual warmup starts from a small LR at every kn.

``search`` runs LARS (LR multipliers ``LARS_MULTS``), LAMB (``LAMB_LRS``) and, as a
control, SGD below the linear rule (``SGD_MULTS``) at kn = 4096 for the given seeds;
``grid`` runs the kn = 256 SGD reference and every optimizer at kn = 2048, 4096, 8192.
One training at a time, one intra-op thread (the machine is shared)::

    .venv/bin/python bench/lars_knee.py --out runs/lars_knee search --seeds 0
    .venv/bin/python bench/lars_knee.py --out runs/lars_knee grid --seeds 0 1 2
    .venv/bin/python bench/lars_knee.py --out runs/lars_knee library-defaults --seeds 0
    .venv/bin/python bench/lars_knee.py --out runs/lars_knee table --seeds 0 1 2

``library-defaults`` runs LAMB at kn = 4096 wired as before issue 13 (BN and biases
adapted, the library's defaults), to see what the fix changes.

Each run writes OUT/<name>/metrics.jsonl and summary.json; runs already done are skipped,
so an interrupted command can be repeated. ``table`` prints every finished run (mean
over the seeds found) and the knee table: kn x optimizer at the chosen LRs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.sink import JsonlSink  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402

N = 32  # samples per worker, as the kn = 32 reference (k = 1)
SGD_BASE_LR, SGD_REF = 0.05, 32
LAMB_REF = 4096  # the kn at which --lamb-lr is given; sqrt scaling elsewhere
BASE: dict[str, Any] = {
    "model": "mnist1d_cnn",
    "dataset": "mnist1d",
    "dataset_size": 40960,  # floor(0.8 * 40960) = 32768 training samples
    "batch_per_worker": N,
    "warmup": "gradual",
    "decay": "step",
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "norm": "bn_local",
    "checkpoint": False,
    "device": "cpu",
}
GRID_KN = [2048, 4096, 8192]
SEARCH_KN = 4096
LARS_MULTS = [0.25, 1.0, 2.0, 4.0, 8.0, 16.0, 64.0]
SGD_MULTS = [1 / 32, 1 / 16, 0.125, 0.25, 0.5]
LAMB_LRS = [0.005, 0.02, 0.04, 0.08, 0.16, 0.32]


def make_spec(
    optimizer: str, kn: int, seed: int, epochs: int, *, mult: float = 1.0, lamb_lr: float
) -> RunSpec:
    """The RunSpec of one cell of the grid."""
    spec: dict[str, Any] = {
        **BASE,
        "optimizer": optimizer,
        "workers": kn // N,
        "epochs": epochs,
        "warmup_epochs": 5 * epochs / 30,  # 5 of 30 epochs; kept in proportion when cut
        "seed": seed,
    }
    if optimizer == "lamb":
        # Referenced to kn = 32 like SGD, so gradual warmup ramps up from a small LR at
        # every kn (the schedule warms up only when the peak is above base_lr).
        base = lamb_lr / math.sqrt(LAMB_REF / SGD_REF)
        spec.update(base_lr=base, ref_batch=SGD_REF, scaling="sqrt")
    else:
        # mult: the LR as a multiple of the linear rule's SGD LR (sgd and lars)
        spec.update(base_lr=SGD_BASE_LR * mult, ref_batch=SGD_REF, scaling="linear")
    return RunSpec.model_validate(spec)


def run_name(optimizer: str, kn: int, seed: int, epochs: int, spec: RunSpec) -> str:
    return f"{optimizer}-kn{kn}-peak{spec.peak_lr:.4g}-e{epochs}-s{seed}"


def _library_default_lamb(model: Any, name: str, lr: float, **kw: Any) -> Any:
    """batchlab's LAMB wiring before issue 13: the library's defaults, BN and biases adapted
    (only their weight decay is 0), AdamW-style decay, the step divided by 1 - beta1^t."""
    import pytorch_optimizer

    from trainer.optim import decay_groups

    assert name == "lamb"
    return pytorch_optimizer.Lamb(decay_groups(model, kw["weight_decay"]), lr=lr)


def train(out: Path, name: str, spec: RunSpec, variant: str = "") -> dict[str, Any]:
    """Run ``spec`` into OUT/name (skipped when its summary exists); its summary.

    ``variant="library-defaults"`` builds LAMB as batchlab did before issue 13."""
    import torch

    from trainer import fit

    run_dir = out / name
    done = run_dir / "summary.json"
    if done.exists():
        print(f"{name}: done already", flush=True)
        return json.loads(done.read_text())
    torch.set_num_threads(1)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    import trainer.optim

    wiring = trainer.optim.layerwise_optimizer
    if variant == "library-defaults":
        trainer.optim.layerwise_optimizer = _library_default_lamb  # type: ignore[assignment]
    try:
        result = fit(spec, JsonlSink(run_dir / "metrics.jsonl"), run_dir=run_dir, resume=False)
    finally:
        trainer.optim.layerwise_optimizer = wiring
    summary = {
        "variant": variant,
        "status": result.status,
        "diverged_step": result.diverged_step,
        "wall_s": time.perf_counter() - t0,
        "spec": spec.model_dump(mode="json"),
        **result.summary,
    }
    done.write_text(json.dumps(summary, indent=2))
    print(
        f"{name}: {result.status} in {summary['wall_s']:.0f} s, "
        f"final val err {summary.get('final_val_err')}",
        flush=True,
    )
    return summary


def cells(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    """(optimizer, kn, mult, lamb_lr) of the command's runs, in running order."""
    if args.command == "search":
        kn = args.search_kn
        runs = [("lars", kn, m, args.lamb_lr) for m in LARS_MULTS]
        runs += [("lamb", kn, 1.0, lr) for lr in LAMB_LRS]
        # Control: does SGD alone, at a smaller LR than the linear rule's, pass the knee?
        runs += [("sgd", kn, m, args.lamb_lr) for m in args.sgd_mults]
        return [r for r in runs if r[0] in args.optimizers]
    runs = [("sgd", 256, 1.0, args.lamb_lr)]
    mults = {"lars": args.lars_mult}
    runs += [(o, kn, mults.get(o, 1.0), args.lamb_lr) for kn in GRID_KN for o in args.optimizers]
    return runs


def table(out: Path) -> str:
    """Markdown table of every finished run under ``out``: final val error, mean over seeds."""
    groups: dict[tuple[str, int, float, int, str], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*/summary.json")):
        s = json.loads(path.read_text())
        spec = s["spec"]
        kn = spec["workers"] * spec["batch_per_worker"]
        key = (spec["optimizer"], kn, spec["base_lr"], spec["epochs"], s.get("variant", ""))
        groups.setdefault(key, []).append(s)
    lines = [
        "| optimizer | kn | base_lr (ref_batch) | peak LR | epochs | seeds | final val err (%) "
        "| per seed (%) | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (opt, kn, base_lr, epochs, variant), runs in sorted(groups.items()):
        spec = RunSpec.model_validate(runs[0]["spec"])
        errs = [100 * r["final_val_err"] for r in runs if r.get("final_val_err") is not None]
        mean = statistics.fmean(errs) if errs else float("nan")
        spread = f" ± {statistics.stdev(errs):.2f}" if len(errs) > 1 else ""
        per_seed = ", ".join(f"{e:.2f}" for e in errs) or "-"
        status = {r["status"] for r in runs} - {"succeeded"}
        note = f" ({', '.join(sorted(status))})" if status else ""
        note += f", {variant}" if variant else ""
        wall = statistics.fmean(r["wall_s"] for r in runs)
        lines.append(
            f"| {opt}{note} | {kn} | {base_lr:g} ({spec.ref_batch}) | {spec.peak_lr:.4g} | "
            f"{epochs} | {len(runs)} | {mean:.2f}{spread} | {per_seed} | {wall:.0f} |"
        )
    return "\n".join(lines)


def knee_table(out: Path, args: argparse.Namespace) -> str:
    """Final val error (%) per kn x optimizer at the chosen LRs: mean ± std over seeds."""
    cols = args.optimizers
    cell: dict[tuple[int, str], list[float]] = {}
    for kn in [256, *GRID_KN]:
        for opt in cols:
            seeds = []
            for seed in args.seeds:
                spec = make_spec(
                    opt,
                    kn,
                    seed,
                    args.epochs,
                    mult=args.lars_mult if opt == "lars" else 1.0,
                    lamb_lr=args.lamb_lr,
                )
                path = out / run_name(opt, kn, seed, args.epochs, spec) / "summary.json"
                if path.exists():
                    err = json.loads(path.read_text()).get("final_val_err")
                    seeds.append(float("nan") if err is None else 100 * err)
            cell[kn, opt] = seeds

    def fmt(errs: list[float]) -> str:
        if not errs:
            return "-"
        spread = f" ± {statistics.stdev(errs):.2f}" if len(errs) > 1 else ""
        return f"{statistics.fmean(errs):.2f}{spread} (n={len(errs)})"

    head = "| kn | " + " | ".join(cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for kn in [256, *GRID_KN]:
        if any(cell[kn, o] for o in cols):
            lines.append(f"| {kn} | " + " | ".join(fmt(cell[kn, o]) for o in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lars_knee")
    parser.add_argument("command", choices=["search", "grid", "table", "time", "library-defaults"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--search-kn", type=int, default=SEARCH_KN, help="kn of search")
    parser.add_argument("--sgd-mults", type=float, nargs="+", default=SGD_MULTS)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "lars", "lamb"])
    parser.add_argument("--lars-mult", type=float, default=4.0)
    parser.add_argument("--lamb-lr", type=float, default=0.08)
    args = parser.parse_args(argv)
    if args.command == "table":
        print(table(args.out), knee_table(args.out, args), sep="\n\n")
        return
    if args.command == "time":  # one short run to size the grid
        spec = make_spec("sgd", SEARCH_KN, 0, args.epochs, lamb_lr=args.lamb_lr)
        train(args.out / "timing", f"time-e{args.epochs}", spec)
        return
    if args.command == "library-defaults":  # LAMB as wired before, at the chosen LR
        for seed in args.seeds:
            spec = make_spec("lamb", SEARCH_KN, seed, args.epochs, lamb_lr=args.lamb_lr)
            name = "libdefaults-" + run_name("lamb", SEARCH_KN, seed, args.epochs, spec)
            train(args.out, name, spec, variant="library-defaults")
        print(table(args.out))
        return
    for seed in args.seeds:
        for opt, kn, mult, lamb_lr in cells(args):
            spec = make_spec(opt, kn, seed, args.epochs, mult=mult, lamb_lr=lamb_lr)
            train(args.out, run_name(opt, kn, seed, args.epochs, spec), spec)
    print(table(args.out), knee_table(args.out, args), sep="\n\n")


if __name__ == "__main__":
    main()
