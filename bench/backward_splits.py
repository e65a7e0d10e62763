"""Seed 004's "one forward, many backward", side by side with the plain runs it resembles.

One kn (default 500 = 10 workers of n=50, on MNIST-1D's 4000 training samples, the
MNIST-1D CNN with per-worker BN), a fixed LR as in the seed (no scaling, no warmup, no
decay; momentum 0.9 by default, the seed's 0.5 with ``--momentum 0.5``), and for each m:

- ``split m``: ``backward_splits=m`` at kn: one forward, m updates from chunks of kn/m;
- ``plain kn/m``: plain training at batch kn/m with the same LR (m times more forwards);
- ``plain kn, LR x m``: plain training at kn with m times the LR (the seed's reading:
  "a big batch cut into 10 backward passes is about a 10x larger LR").

Columns: time per update (the run's training time / its updates; validation excluded),
updates and wall-clock seconds until the validation accuracy first reaches the target
(validation after every epoch, so both are at epoch granularity; the wall clock includes
validation), the final validation error and the median of the last 5. A second table
times one kn batch of each kind (plain kn step, split step, m plain kn/m steps) in
alternating rounds, which the machine's load drifts affect alike.

    .venv/bin/python bench/backward_splits.py
    .venv/bin/python bench/backward_splits.py --seeds 0 1 --momentum 0.5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer import fit  # noqa: E402
from trainer.batches import Batch  # noqa: E402
from trainer.data import load_datasets  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.norms import set_group_size  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.sink import MemorySink  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402
from trainer.splits import chunk_gradients  # noqa: E402


def make_spec(args: argparse.Namespace, kn: int, lr: float, splits: int, seed: int) -> RunSpec:
    n = args.n
    return RunSpec(
        model="mnist1d_cnn",
        dataset="mnist1d",
        dataset_size=args.size,
        epochs=args.epochs,
        workers=kn // n,
        batch_per_worker=n,
        base_lr=lr,
        scaling="none",  # the seed keeps one LR for every batch size
        warmup="none",
        decay="constant",
        milestones=[],
        momentum=args.momentum,
        backward_splits=splits,
        target_accuracy=args.target,
        checkpoint=False,
        divergence_factor=1e6,  # report what happens, do not stop
        device="cpu",
        seed=seed,
    )


def measure(spec: RunSpec) -> dict[str, Any]:
    sink = MemorySink()
    t0 = time.perf_counter()
    result = fit(spec, sink)
    total = time.perf_counter() - t0
    steps = sink.series("step_time")
    s = result.summary
    return {
        "status": result.status,
        "updates": result.iterations,
        "ms_per_update": 1000 * sum(steps) / len(steps),
        "updates_to_target": s["iters_to_target"],
        "s_to_target": s["time_to_target_s"],
        "final_val_err": s["final_val_err"],
        "median5_val_err": s["median_last5_val_err"],
        "total_s": total,
    }


def time_steps(args: argparse.Namespace) -> dict[str, tuple[int, list[float]]]:
    """Seconds per kn batch of a plain step at kn, of a split step for each m, and of m
    plain steps at kn/m, in alternating rounds (machine load drifts; it then hits all
    alike). Each sample times ``args.reps`` calls."""
    kn = args.kn
    spec = make_spec(args, kn, args.lr, 1, 0)
    torch.manual_seed(0)
    data = load_datasets(spec)
    model = build_model(spec, num_classes=data.num_classes)
    set_group_size(model, args.n)
    opt = build_optimizer(model, spec)
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = data.train.tensors  # type: ignore[attr-defined]
    batch = Batch(x[:kn], y[:kn])

    def plain(b: Batch) -> None:  # the loop's step: sum(CE) / batch, backward, step
        loss = F.cross_entropy(model(b.x), b.y, reduction="sum") / len(b.y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def split(m: int) -> None:
        chunks = chunk_gradients(model, params, batch, m, nullcontext)
        for grads in chunks.grads:
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)

    def small(m: int) -> None:
        c = kn // m
        for j in range(m):
            plain(Batch(batch.x[j * c : (j + 1) * c], batch.y[j * c : (j + 1) * c]))

    cases: dict[str, tuple[int, Any]] = {"plain kn": (1, lambda: plain(batch))}
    for m in args.splits:
        cases[f"split m={m}"] = (m, lambda m=m: split(m))
        cases[f"plain kn/{m}, {m} steps"] = (m, lambda m=m: small(m))
    out: dict[str, tuple[int, list[float]]] = {name: (u, []) for name, (u, _) in cases.items()}
    for r in range(args.rounds + 1):
        for name, (_, fn) in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.reps):
                fn()
            if r:  # round 0 warms up
                out[name][1].append((time.perf_counter() - t0) / args.reps)
    return out


def fmt(v: Any, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kn", type=int, default=500)
    p.add_argument("--n", type=int, default=50, help="samples per worker (BN group)")
    p.add_argument("--splits", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9, help="the seed used 0.5")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--size", type=int, default=5000, help="MNIST-1D samples (80%% train)")
    p.add_argument("--target", type=float, default=0.75, help="validation accuracy")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rounds", type=int, default=20, help="timing rounds (alternating)")
    p.add_argument("--reps", type=int, default=5, help="calls per timing sample")
    args = p.parse_args()
    for m in args.splits:
        if args.kn % (m * args.n):
            p.error(f"--splits {m}: kn/m must be whole workers of n={args.n}")
    torch.set_num_threads(1)
    os.environ.setdefault("BATCHLAB_HOME", tempfile.mkdtemp(prefix="bench_splits_"))

    kn, lr = args.kn, args.lr
    timing = time_steps(args)
    configs: list[tuple[str, int, int, float, int]] = [("plain kn", 1, kn, lr, 1)]
    for m in args.splits:
        configs += [
            (f"split m={m}", m, kn, lr, m),
            (f"plain kn/{m}", m, kn // m, lr, 1),
            (f"plain kn, LR x{m}", m, kn, lr * m, 1),
        ]
    # Warm up (dataset generation, first-call overheads) outside the measured runs.
    measure(make_spec(args, kn, lr, 1, args.seeds[0]).model_copy(update={"epochs": 1}))
    rows = []
    for name, m, batch, run_lr, splits in configs:
        per_seed = [measure(make_spec(args, batch, run_lr, splits, s)) for s in args.seeds]
        rows.append((name, m, batch // splits, run_lr, per_seed))
        print(f"  done: {name} ({sum(r['total_s'] for r in per_seed):.0f} s)", file=sys.stderr)

    print(
        f"MNIST-1D CNN (bn_local, n={args.n}), kn={kn}, {args.epochs} epochs, "
        f"{int(args.size * 0.8)} training samples, momentum {args.momentum:g}, fixed LR, "
        f"target accuracy {args.target}, seeds {args.seeds}, 1 thread"
    )
    header = (
        "| run | batch / update | LR | ms / update | updates to target | s to target "
        "| final val err | median last 5 |"
    )
    print(header)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, _, per_update, run_lr, per_seed in rows:

        def med(key: str, per_seed: list[dict[str, Any]] = per_seed) -> float | None:
            vals = [r[key] for r in per_seed if r[key] is not None]
            # a target missed by any seed is missed: report it as such
            return statistics.median(vals) if len(vals) == len(per_seed) else None

        print(
            f"| {name} | {per_update} | {run_lr:g} | {fmt(med('ms_per_update'), '.1f')} "
            f"| {fmt(med('updates_to_target'), '.0f')} | {fmt(med('s_to_target'), '.1f')} "
            f"| {fmt(med('final_val_err'), '.3f')} | {fmt(med('median5_val_err'), '.3f')} |"
        )

    base = statistics.median(timing["plain kn"][1])
    print(
        f"\nCost of one kn={kn} batch, alternating rounds: median of {args.rounds} samples "
        f"of {args.reps} calls each"
    )
    print("| step | ms per kn batch | x plain kn step | updates | ms per update |")
    print("|---|---:|---:|---:|---:|")
    for name, (updates, samples) in timing.items():
        ms = 1000 * statistics.median(samples)
        print(f"| {name} | {ms:.1f} | {ms / 1000 / base:.2f} | {updates} | {ms / updates:.1f} |")


if __name__ == "__main__":
    main()
