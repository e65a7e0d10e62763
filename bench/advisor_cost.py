"""What the noise scale and layer health (issue 13) cost a training step, against off.

Trains the same run again and again in this process, cycling through four settings
(off; noise only; health only; both, at the given intervals, by default the RunSpec
defaults) so that drift in machine load hits all alike. Three figures per run, each per
iteration (means, not medians of step times: the probes work on one iteration in
``noise_every`` / ``health_every``, which a median would hide):

- wall: the sum of the loop's ``step_time`` (forward, backward, step, the probes' work and
  the metric flushes, where the probes' host side runs) over the run's iterations;
- cpu: the training thread's CPU time from the sink's ``start`` to its ``close`` (with one
  intra-op thread all the work is on it; unlike wall time it does not count the time the
  thread waits for a core, so it is the steadier figure on a shared machine; it includes
  the one validation at the end, the same in every setting);
- in probes: the training thread's CPU time inside the probes' methods and the health
  ReLU hook (what the probes add, measured inside the run).

Reported per layout: the median over repeats, the interquartile range, and the change
against off.

    .venv/bin/python bench/advisor_cost.py --repeats 25 --iters 60
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer import fit  # noqa: E402
from trainer.health import HealthProbe  # noqa: E402
from trainer.noise import NoiseProbe  # noqa: E402
from trainer.sink import MemorySink  # noqa: E402
from trainer.spec import DEFAULT_HEALTH_EVERY, DEFAULT_NOISE_EVERY, RunSpec  # noqa: E402

# (label, spec fields): the noise probe's three paths on the MNIST-1D CNN.
LAYOUTS: list[tuple[str, dict[str, Any]]] = [
    ("kn=32 k=1 n=32, the spec's default (paired with the previous batch: 32 more)", {}),
    ("kn=256 k=8 n=32 (extra pass, 32 samples)", {"workers": 8, "batch_per_worker": 32}),
    (
        "kn=256 k=1 n=256 (paired with the previous batch: 256 more)",
        {"workers": 1, "batch_per_worker": 256},
    ),
    (
        "kn=1024 k=32 n=32 micro 256 (first chunk)",
        {"workers": 32, "batch_per_worker": 32, "micro_batch": 256},
    ),
]


PROBED = [
    (NoiseProbe, ("begin", "before_step", "after_step", "take")),
    (HealthProbe, ("begin", "before_step", "after_step", "take", "_relu_hook")),
]
_in_probes = [0.0]


def _timed(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kw: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args, **kw)
        finally:
            _in_probes[0] += time.thread_time() - t0

    return wrapper


def _patch_probes() -> None:
    """Count the CPU time the training thread spends inside the probes' methods."""
    for cls, names in PROBED:
        for name in names:
            setattr(cls, name, _timed(getattr(cls, name)))


class CpuTimed(MemorySink):
    """MemorySink that notes the training thread's CPU time from start() to close()."""

    def start(self, meta: Any) -> None:
        super().start(meta)
        self.cpu = time.thread_time()

    def close(self) -> None:
        super().close()
        self.cpu = time.thread_time() - self.cpu


def measure(spec: RunSpec) -> tuple[float, float, float]:
    """(wall, cpu, in probes) seconds per iteration of one run."""
    sink = CpuTimed()
    _in_probes[0] = 0.0
    result = fit(spec, sink)
    assert result.status == "succeeded", result
    times = sink.series("step_time")
    return sum(times) / len(times), sink.cpu / len(times), _in_probes[0] / len(times)


def _row(name: str, values: list[float], ref: float) -> str:
    q1, _, q3 = statistics.quantiles(values, n=4)
    med = statistics.median(values)
    change = f"{(med / ref - 1) * 100:+7.1f}%" if ref else ""
    return f"{med * 1e3:8.3f} ({q1 * 1e3:.2f}-{q3 * 1e3:.2f}) {change:>8}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iters", type=int, default=60, help="at least this many per run")
    parser.add_argument("--noise-every", type=int, default=DEFAULT_NOISE_EVERY)
    parser.add_argument("--health-every", type=int, default=DEFAULT_HEALTH_EVERY)
    parser.add_argument("--model", default="mnist1d_cnn")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--layout", type=int, action="append", help="only these rows of LAYOUTS (0-based)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # as bench/sink_overhead.py: a steadier figure on a shared CPU
    _patch_probes()

    modes = {
        "off": (0, 0),
        "noise": (args.noise_every, 0),
        "health": (0, args.health_every),
        "both": (args.noise_every, args.health_every),
    }
    print(
        f"model {args.model}, MNIST-1D (4000 training samples), >= {args.iters} iterations, "
        f"noise_every={args.noise_every}, health_every={args.health_every}, "
        f"{args.repeats} interleaved repeats, device {args.device}, 1 thread; "
        "ms per iteration, median (IQR) and change against off"
    )
    chosen = args.layout if args.layout is not None else range(len(LAYOUTS))
    for label, fields in (LAYOUTS[i] for i in chosen):
        base = {
            "model": args.model,
            "dataset": "mnist1d",
            "epochs": 1,
            "warmup": "none",
            "milestones": [],
            "checkpoint": False,
            "device": args.device,
            **fields,
        }
        ipe = RunSpec(**base).iters_per_epoch
        epochs = -(-args.iters // ipe)
        base.update(epochs=epochs, eval_every=epochs)  # one validation, at the end
        specs = {
            m: RunSpec(**base, noise_every=ne, health_every=he) for m, (ne, he) in modes.items()
        }
        measure(specs["off"])  # warm-up: data generation/cache, allocator
        figures: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for m, spec in specs.items():
                figures[m].append(measure(spec))
        print(f"\n{label}: {ipe * epochs} iterations per run")
        print(f"  {'setting':8} {'wall':>28} {'cpu':>28} {'in probes (% of cpu)':>24}")
        wall_off = statistics.median(f[0] for f in figures["off"])
        cpu_off = statistics.median(f[1] for f in figures["off"])
        for m, rows in figures.items():
            walls, cpus, probes = ([r[i] for r in rows] for i in range(3))
            share = statistics.median(p / c for p, c in zip(probes, cpus, strict=True))
            print(
                f"  {m:8} {_row(m, walls, wall_off):>28} {_row(m, cpus, cpu_off):>28} "
                f"{statistics.median(probes) * 1e3:8.3f} ({share * 100:4.1f}%)"
            )


if __name__ == "__main__":
    main()
