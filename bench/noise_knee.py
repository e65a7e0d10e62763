"""The gradient noise scale's predicted critical batch against the measured knee (issue 13).

On MNIST-1D (the data, model and SGD linear rule of bench/lars_knee.py: 32,768 training
samples, 30 epochs, gradual warmup, eta = 0.05 at kn = 32, n = 32 per worker, k = kn / 32
virtual workers), compares McCandlish et al.'s B_simple, measured on the kn = 256
baseline, with the knee of the batch-size sweep. Both use batchlab's own rules
(trainer/advice.py, the ones the sweep page draws): ``critical_batch`` (median and
quartiles of ``noise_scale`` over each baseline run's last half of training, pooled over
seeds) and ``knee`` (the smallest kn whose mean final val error exceeds the baseline mean
by max(2 std, 1 point)).

``train`` runs the SGD linear-rule cells missing from ``--out``: by default kn = 256 (the
baseline), 512, 1024, 2048, 4096, 8192 and, to narrow the knee between 2048 and 4096,
2304, 2560 and 3072 (not powers of two: the last partial batch of each epoch is dropped,
at most 2,048 samples); one at a time with one intra-op thread, skipping runs already there (so
lars_knee.py's ``grid`` runs are reused). ``noise_every = 10``, as the linear-rule runs
lars_knee.py made (the spec's default was 10 then; it is 20 now). ``report`` reads every
SGD linear-rule run under ``--out`` and prints the table, the prediction, the knee, their
ratio and the noise scale's trajectory over training (median per 5 epochs);
``--ladder-only`` keeps the powers of two alone, as a sweep would see them::

    .venv/bin/python bench/noise_knee.py --out runs/lars_knee train --seeds 0 1 2
    .venv/bin/python bench/noise_knee.py --out runs/lars_knee report
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lars_knee import SGD_BASE_LR, SGD_REF, N, make_spec, run_name, train  # noqa: E402

from trainer.advice import Outcome, critical_batch, knee, last_half  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402

BASELINE_KN = 256
TRAIN_KN = [256, 512, 1024, 2048, 2304, 2560, 3072, 4096, 8192]
# The linear-rule runs lars_knee.py made measured the noise scale every 10 iterations
# (the spec's default then); the new runs match them so every cell has the same spec.
NOISE_EVERY = 10
WINDOW_EPOCHS = 5


def linear_spec(kn: int, seed: int, epochs: int) -> RunSpec:
    """lars_knee.py's SGD linear-rule spec at kn, with the existing runs' noise_every."""
    spec = make_spec("sgd", kn, seed, epochs, lamb_lr=0.0).model_dump()
    return RunSpec.model_validate({**spec, "noise_every": NOISE_EVERY})


def is_linear_sgd(summary: dict[str, Any], epochs: int) -> bool:
    """An SGD run at the linear rule's LR (not an LR search cell, not LARS/LAMB)."""
    spec = summary["spec"]
    return (
        spec["optimizer"] == "sgd"
        and spec["scaling"] == "linear"
        and spec["ref_batch"] == SGD_REF
        and math.isclose(spec["base_lr"], SGD_BASE_LR)
        and spec["batch_per_worker"] == N
        and spec["epochs"] == epochs
        and not summary.get("variant")
    )


def read_runs(out: Path, epochs: int) -> list[tuple[Path, dict[str, Any]]]:
    runs = []
    for path in sorted(out.glob("*/summary.json")):
        summary = json.loads(path.read_text())
        if is_linear_sgd(summary, epochs):
            runs.append((path.parent, summary))
    return runs


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    with (run_dir / "metrics.jsonl").open() as f:
        for line in f:
            row = json.loads(line)
            if "step" in row:
                rows.append(row)
    return rows


def noise_series(rows: list[dict[str, Any]]) -> tuple[list[int], list[float | None], int]:
    """(steps, noise_scale values, last trained step: its last ``loss`` step)."""
    points = [(r["step"], r["noise_scale"]) for r in rows if "noise_scale" in r]
    last = max(r["step"] for r in rows if "loss" in r)
    return [s for s, _ in points], [v for _, v in points], last


def trajectory(rows_per_run: list[list[dict[str, Any]]], epochs: int) -> list[str]:
    """Median noise scale (pooled over runs) per WINDOW_EPOCHS epochs, with the number of
    measurements whose EMA'd |G|^2 was not positive (no ``noise_scale`` stored) and the
    mean training loss."""
    lines = [
        "| epochs | median noise_scale | quartiles | defined / measured | mean train loss |",
        "|---|---|---|---|---|",
    ]
    for lo in range(0, epochs, WINDOW_EPOCHS):
        hi = lo + WINDOW_EPOCHS
        window = [r for rows in rows_per_run for r in rows if lo < r["epoch"] <= hi]
        measured = [r for r in window if "noise_trace" in r]
        vals = [r["noise_scale"] for r in measured if r.get("noise_scale") is not None]
        vals = [v for v in vals if math.isfinite(v)]
        losses = [r["loss"] for r in window if "loss" in r]
        loss = f"{statistics.fmean(losses):.3f}" if losses else "-"
        if not vals:
            lines.append(f"| {lo}-{hi} | - | - | 0 / {len(measured)} | {loss} |")
            continue
        q25, med, q75 = np.percentile(vals, [25, 50, 75])
        lines.append(
            f"| {lo}-{hi} | {med:.0f} | {q25:.0f}-{q75:.0f} | {len(vals)} / {len(measured)} "
            f"| {loss} |"
        )
    return lines


def undefined_view(rows_per_run: list[list[dict[str, Any]]]) -> list[str]:
    """What the rule's median leaves out: last-half measurements with |G|^2 <= 0 (B_simple
    undefined, i.e. beyond what a 32-vs-256 pair resolves), and two estimators that keep
    them: the pooled median counting them as +inf, and mean tr(Sigma) / mean |G|^2."""
    scales: list[float] = []
    trace: list[float] = []
    g2: list[float] = []
    for rows in rows_per_run:
        last = max(r["step"] for r in rows if "loss" in r)
        for r in rows:
            if "noise_trace" in r and 2 * r["step"] >= last:
                trace.append(r["noise_trace"])
                g2.append(r["noise_g2"])
                v = r.get("noise_scale")
                scales.append(v if v is not None and math.isfinite(v) else math.inf)
    undefined = sum(1 for v in scales if math.isinf(v))
    ordered = sorted(scales)
    mid = ordered[(len(ordered) - 1) // 2]  # the lower median: no interpolation with inf
    g2_mean = statistics.fmean(g2)
    ratio = (
        f"{statistics.fmean(trace) / g2_mean:.0f}" if g2_mean > 0 else "undefined (mean |G|^2 <= 0)"
    )
    return [
        f"last-half measurements with |G|^2 <= 0 (no noise_scale, left out by the rule): "
        f"{undefined} of {len(scales)}",
        f"pooled median counting them as +inf: {mid:.0f}",
        f"mean tr(Sigma) / mean |G|^2 over the last half, pooled: {ratio}",
    ]


def own_scale(runs: list[tuple[Path, dict[str, Any]]]) -> str:
    """A kn's own noise scale by the critical-batch rule (its seeds' last halves pooled),
    with how many of its last-half measurements had a defined (positive) estimate."""
    series, last_steps, measured = {}, {}, 0
    for i, (run_dir, _) in enumerate(runs):
        rows = read_metrics(run_dir)
        steps, values, last = noise_series(rows)
        series[i], last_steps[i] = (steps, values), last
        measured += sum(1 for r in rows if "noise_trace" in r and 2 * r["step"] >= last)
    crit = critical_batch(series, last_steps)
    return "-" if crit is None else f"{crit.median:.0f} ({crit.points} / {measured})"


def report(out: Path, epochs: int, ladder_only: bool) -> str:
    runs = read_runs(out, epochs)
    by_kn: dict[int, list[tuple[Path, dict[str, Any]]]] = {}
    for run_dir, s in runs:
        by_kn.setdefault(s["spec"]["workers"] * s["spec"]["batch_per_worker"], []).append(
            (run_dir, s)
        )
    if ladder_only:  # the dashboard's sweeps are powers of two
        by_kn = {kn: r for kn, r in by_kn.items() if kn & (kn - 1) == 0}
    if BASELINE_KN not in by_kn:
        raise SystemExit(f"--out: no kn = {BASELINE_KN} baseline run in {out}")

    base_rows = {i: read_metrics(d) for i, (d, _) in enumerate(by_kn[BASELINE_KN])}
    series, last_steps = {}, {}
    for i, rows in base_rows.items():
        steps, values, last = noise_series(rows)
        series[i], last_steps[i] = (steps, values), last
    crit = critical_batch(series, last_steps)

    outcomes = [
        Outcome(kn, s["status"], kn == BASELINE_KN, s.get("final_val_err"))
        for kn, rs in by_kn.items()
        for _, s in rs
    ]
    kn_knee = knee(outcomes)
    if crit is None or kn_knee is None:
        raise SystemExit("--out: the baseline has no noise scale or no finished seed")

    lines = [
        "| kn | peak LR | seeds | final val err (%) mean ± std | per seed (%) | past the knee "
        "| own noise_scale, last half: median (defined / measured) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kn in sorted(by_kn):
        rs = by_kn[kn]
        errs = [100 * s["final_val_err"] for _, s in rs if s.get("final_val_err") is not None]
        spread = f" ± {statistics.stdev(errs):.2f}" if len(errs) > 1 else ""
        statuses = {s["status"] for _, s in rs} - {"succeeded"}
        note = f" ({', '.join(sorted(statuses))})" if statuses else ""
        # Each kn judged alone by advice.knee (the baseline and that kn): past it or not.
        alone = knee([o for o in outcomes if o.is_baseline or o.total_batch == kn])
        past = "yes" if alone is not None and alone.batch_size == kn else "no"
        past = "baseline" if kn == BASELINE_KN else past
        lines.append(
            f"| {kn} | {rs[0][1]['spec']['base_lr'] * kn / SGD_REF:.4g} | {len(rs)} | "
            f"{statistics.fmean(errs):.2f}{spread}{note} | "
            f"{', '.join(f'{e:.2f}' for e in errs)} | {past} | {own_scale(rs)} |"
        )
    below = max(
        (kn for kn in by_kn if kn_knee.batch_size and kn < kn_knee.batch_size), default=None
    )
    lines += [
        "",
        f"predicted critical batch (B_simple, kn = {BASELINE_KN} baseline, last half, "
        f"{len(crit.run_ids)} seeds, {crit.points} points): median {crit.median:.0f}, "
        f"quartiles {crit.q25:.0f}-{crit.q75:.0f}",
        f"knee rule: {kn_knee.rule}",
        f"threshold: {100 * kn_knee.threshold:.2f}% (baseline {100 * kn_knee.baseline_mean:.2f}"
        f" ± {100 * kn_knee.baseline_std:.2f}%)",
        f"measured knee: kn = {kn_knee.batch_size} (largest kn below it: {below})",
    ]
    if kn_knee.batch_size:
        lines.append(
            f"ratio B_simple / knee: {crit.median / kn_knee.batch_size:.3f} "
            f"(quartiles {crit.q25 / kn_knee.batch_size:.3f}-{crit.q75 / kn_knee.batch_size:.3f})"
        )
        if below:
            lines.append(
                f"ratio B_simple / largest kn below the knee ({below}): {crit.median / below:.3f}"
            )
    per_seed = [
        f"seed run {by_kn[BASELINE_KN][i][0].name}: median "
        f"{statistics.median(last_half(*series[i], last_steps[i])):.0f}"
        for i in series
        if last_half(*series[i], last_steps[i])
    ]
    lines += ["", *per_seed, "", "noise scale over training (kn = 256 baseline, seeds pooled):"]
    lines += trajectory(list(base_rows.values()), epochs)
    lines += ["", *undefined_view(list(base_rows.values()))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "lars_knee")
    parser.add_argument("command", choices=["train", "report"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kn", type=int, nargs="+", default=TRAIN_KN)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--ladder-only", action="store_true", help="report: powers of two only (as a sweep)"
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        for kn in args.kn:
            for seed in args.seeds:
                spec = linear_spec(kn, seed, args.epochs)
                train(args.out, run_name("sgd", kn, seed, args.epochs, spec), spec)
        return
    print(report(args.out, args.epochs, args.ladder_only))


if __name__ == "__main__":
    main()
