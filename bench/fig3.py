"""Goyal et al. 2017, Figure 3, at MNIST-1D scale: does a 32x larger batch with the linear
scaling rule follow the baseline's training-error curve once warmup is over?

Runs the four specs of examples/fig3/ (baseline kn=32; kn=1024 with no, constant and
gradual warmup) for each seed, then draws training error against epochs, one panel per
warmup strategy with the baseline in black beneath, and writes a results table.

    .venv/bin/python bench/fig3.py --out runs/fig3 --seeds 0 1
    .venv/bin/python bench/fig3.py --out runs/fig3 --plot-only   # redraw from metrics

Outputs: OUT/<name>-s<seed>/metrics.jsonl, docs/img/fig3_mnist1d.png, and the markdown
table printed at the end (paste it into docs/fig3.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.sink import JsonlSink, read_jsonl  # noqa: E402
from trainer.spec import RunSpec, load_spec  # noqa: E402

SPECS = ["baseline_kn32", "kn1024_none", "kn1024_constant", "kn1024_gradual"]
PANELS = [
    ("kn1024_none", "no warmup"),
    ("kn1024_constant", "constant warmup"),
    ("kn1024_gradual", "gradual warmup"),
]


def run_all(out: Path, seeds: list[int]) -> None:
    from trainer import fit

    for seed in seeds:
        for name in SPECS:
            spec = load_spec(str(ROOT / "examples" / "fig3" / f"{name}.yaml"))
            spec = RunSpec.model_validate({**spec.model_dump(), "seed": seed})
            run_dir = out / f"{name}-s{seed}"
            if (run_dir / "summary.json").exists():
                print(f"{run_dir.name}: done already")
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            t0 = time.perf_counter()
            sink = JsonlSink(run_dir / "metrics.jsonl")
            try:
                result = fit(spec, sink, run_dir=run_dir, resume=False, progress=True)
            finally:
                sink.close()
            summary = {
                "status": result.status,
                "diverged_step": result.diverged_step,
                **result.summary,
            }
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
            print(
                f"{run_dir.name}: {result.status} in {time.perf_counter() - t0:.0f} s, "
                f"val err {summary.get('final_val_err')}"
            )


def epoch_curve(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = {r["step"]: (r["epoch"], r[key]) for r in rows if key in r}
    ordered = [pts[s] for s in sorted(pts)]
    return [p[0] for p in ordered], [100.0 * p[1] for p in ordered]


def per_iteration_error(rows: list[dict], bins_per_epoch: int) -> tuple[list[float], list[float]]:
    """Training error averaged over 1/bins_per_epoch of an epoch (as the paper's curves)."""
    buckets: dict[int, list[float]] = {}
    for r in rows:
        if "train_err" in r:
            buckets.setdefault(int(r["epoch"] * bins_per_epoch - 1e-9), []).append(r["train_err"])
    xs = sorted(buckets)
    return [(b + 1) / bins_per_epoch for b in xs], [100 * statistics.fmean(buckets[b]) for b in xs]


def plot_and_table(out: Path, seeds: list[int]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: dict[str, list[dict]] = {}
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    for name in SPECS:
        for seed in seeds:
            run_dir = out / f"{name}-s{seed}"
            if not (run_dir / "summary.json").exists():
                continue
            results.setdefault(name, []).append(json.loads((run_dir / "summary.json").read_text()))
            curves.setdefault(name, []).append(
                per_iteration_error(read_jsonl(run_dir / "metrics.jsonl"), bins_per_epoch=4)
            )

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    for ax, (name, title) in zip(axes, PANELS, strict=True):
        for xs, ys in curves.get("baseline_kn32", []):
            ax.plot(xs, ys, color="black", lw=1.2, label="kn=32, η=0.05")
        for xs, ys in curves.get(name, []):
            ax.plot(xs, ys, color="tab:orange", lw=1.2, label="kn=1024, η=1.6")
        ax.set_title(title)
        ax.set_xlabel("epochs")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        ax.legend(uniq.values(), uniq.keys())
    axes[0].set_ylabel("training error (%)")
    fig.suptitle("MNIST-1D CNN, Goyal et al. Fig. 3 setting: kn=1024 vs kn=32 baseline")
    fig.tight_layout()
    img = ROOT / "docs" / "img" / "fig3_mnist1d.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)

    def fmt(vals: list[float | None]) -> str:
        vals = [100 * v for v in vals if v is not None]
        if not vals:
            return "—"
        if len(vals) == 1:
            return f"{vals[0]:.2f}"
        return f"{statistics.fmean(vals):.2f} ± {statistics.stdev(vals):.2f}"

    lines = [
        "| run | kn | peak LR | status | final val err (%) | median last 5 (%) "
        "| train err (%) | epochs to 90% val acc |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in SPECS:
        rs = results.get(name, [])
        if not rs:
            continue
        spec = load_spec(str(ROOT / "examples" / "fig3" / f"{name}.yaml"))
        etas = [r.get("epochs_to_target") for r in rs]
        lines.append(
            f"| {name} | {spec.total_batch} | {spec.peak_lr:g} "
            f"| {', '.join(sorted({r['status'] for r in rs}))} "
            f"| {fmt([r.get('final_val_err') for r in rs])} "
            f"| {fmt([r.get('median_last5_val_err') for r in rs])} "
            f"| {fmt([r.get('final_train_err') for r in rs])} "
            f"| {', '.join('—' if e is None else f'{e:g}' for e in etas)} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "fig3")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not args.plot_only:
        run_all(args.out, args.seeds)
    print(plot_and_table(args.out, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
