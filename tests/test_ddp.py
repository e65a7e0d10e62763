"""k virtual workers in one process == the same k workers over 2 real DDP processes.

The virtual side is ``trainer.fit`` in this process. The DDP side is either the full
launch path, ``batchlab train --nproc 2`` (which starts ``python -m
torch.distributed.run --standalone --nproc_per_node 2`` re-entering ``batchlab train``),
or, for the other variants, two processes forked from this one that call ``trainer.fit``
with torchrun's environment (gloo on CPU; forking skips re-importing torch). Same
per-step losses, errors, gradient norms and final parameters, to float rounding: the two
sides sum the gradient in different orders. BN running statistics too: each process
keeps its own, and they are averaged before evaluation and checkpoints, which gives the
statistics of the virtual run (trainer/distributed.py), so validation figures match.
"""

from __future__ import annotations

import faulthandler
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from support import free_port

from trainer import fit
from trainer.checkpoint import load_checkpoint
from trainer.sink import JsonlSink, MemorySink, NullSink, read_jsonl
from trainer.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
REL_TOL = 1e-5
STEPS = 10


pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


def make_spec(**extra: Any) -> RunSpec:
    base: dict[str, Any] = {
        "model": "mlp",
        "norm": "bn_local",
        "dataset": "synthetic",
        "dataset_size": 200,  # 160 training samples, kn = 32: 5 iterations per epoch
        "epochs": 2,
        "workers": 4,
        "batch_per_worker": 8,
        "base_lr": 0.05,
        "ref_batch": 8,  # the LR ramps from 0.05 to 0.2 over the first epoch
        "warmup_epochs": 1,
        "milestones": [1.6],
        "weight_decay": 1e-3,
        "device": "cpu",
        "seed": 5,
    }
    base.update(extra)
    return RunSpec(**base)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def compare(ddp_dir: Path, virtual: MemorySink, virtual_dir: Path) -> dict[str, float]:
    """Largest relative differences between the DDP run and the virtual run."""
    rows = [r for r in read_jsonl(ddp_dir / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["train_err"] for r in rows] == virtual.series("train_err")
    assert [r["lr"] for r in rows] == virtual.series("lr")
    a, b = (
        load_checkpoint(ddp_dir / "checkpoint.pt"),
        load_checkpoint(virtual_dir / "checkpoint.pt"),
    )
    assert a is not None and b is not None

    def max_rel_diff(running: bool) -> float:
        return max(
            float((a["model"][k] - b["model"][k]).norm() / b["model"][k].norm())
            for k in b["model"]
            if b["model"][k].is_floating_point() and ("running" in k) == running
        )

    val = [r["val_err"] for r in read_jsonl(ddp_dir / "metrics.jsonl") if "val_err" in r]
    assert val == virtual.series("val_err")
    figures = {
        "loss": max(rel(r["loss"], v) for r, v in zip(rows, virtual.series("loss"), strict=True)),
        "grad_norm": max(
            rel(r["grad_norm"], v) for r, v in zip(rows, virtual.series("grad_norm"), strict=True)
        ),
        "params": max_rel_diff(running=False),
        "running_stats": max_rel_diff(running=True),
    }
    print(", ".join(f"{k} {v:.2e}" for k, v in figures.items()))
    return figures


def run_virtual(spec: RunSpec, run_dir: Path) -> MemorySink:
    sink = MemorySink()
    assert fit(spec, sink, run_dir=run_dir).status == "succeeded"
    return sink


@pytest.mark.slow
def test_batchlab_train_nproc_2_matches_virtual_workers(tmp_path: Path) -> None:
    spec = make_spec()
    virtual = run_virtual(spec, tmp_path / "virtual")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    out = tmp_path / "ddp"
    proc = subprocess.run(
        [sys.executable, "-m", "batchlab.cli", "train", str(spec_file), "--out", str(out),
         "--nproc", "2", "--no-progress"],
        cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "torch.distributed.run --standalone --nproc_per_node=2" in proc.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "succeeded"
    meta = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["meta"]
    assert meta["nproc"] == 2 and meta["micro_batch"] == 16  # 2 workers of 8 per process
    figures = compare(out, virtual, tmp_path / "virtual")
    assert max(figures.values()) < REL_TOL, figures


# --- fit in two forked processes ---------------------------------------------------------


def _rank_main(rank: int, port: int, spec_json: str, out: str, stop_at_once: bool) -> None:
    """One process of a 2-process run, with the environment torchrun would give it."""
    code = 1
    # A hang (e.g. a lock inherited through fork) prints where it is stuck and exits.
    faulthandler.dump_traceback_later(60, exit=True)
    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        )  # fmt: skip
        torch.set_num_threads(1)
        spec = RunSpec.model_validate_json(spec_json)
        sink = JsonlSink(Path(out) / "metrics.jsonl") if rank == 0 else NullSink()
        # As the worker does: only rank 0 is asked; fit shares its answer with rank 1.
        should_stop = (lambda: True) if stop_at_once and rank == 0 else None
        result = fit(spec, sink, run_dir=out, should_stop=should_stop)
        (Path(out) / f"result{rank}.json").write_text(
            json.dumps({"status": result.status, "iterations": result.iterations})
        )
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)  # never run the parent's pytest machinery in the child


def run_forked(spec: RunSpec, out: Path, *, stop_at_once: bool = False) -> list[dict]:
    out.mkdir(parents=True)
    # Finalizers of earlier tests' garbage must run here, not in the forked children.
    gc.collect()
    ctx = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main, args=(rank, port, spec.model_dump_json(), str(out), stop_at_once)
        )
        for rank in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=90)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize(
    "extra",
    [
        # Synchronized BN over both processes == BN over the whole virtual batch; the
        # Caffe momentum form with correction through a changing LR.
        {"model": "mnist1d_cnn", "norm": "bn_sync", "momentum_form": "caffe"},
        # Micro-batches of one worker: DDP accumulates without syncing (no_sync), then
        # all-reduces once per iteration.
        {"micro_batch": 8, "nesterov": True},
    ],
    ids=["cnn-bn_sync-caffe", "mlp-bn_local-micro8-nesterov"],
)
def test_fit_in_two_processes_matches_virtual_workers(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    spec = make_spec(nproc=2, **extra)
    results = run_forked(spec, tmp_path / "ddp")
    assert results == [{"status": "succeeded", "iterations": STEPS}] * 2
    virtual = run_virtual(spec.model_copy(update={"nproc": 1}), tmp_path / "virtual")
    figures = compare(tmp_path / "ddp", virtual, tmp_path / "virtual")
    assert max(figures.values()) < REL_TOL, figures


def test_a_cancel_on_rank_0_stops_both_processes_at_the_same_step(tmp_path: Path) -> None:
    results = run_forked(make_spec(nproc=2), tmp_path / "ddp", stop_at_once=True)
    # Rank 0's answer before the first iteration reaches rank 1 too: neither trains.
    assert results == [{"status": "cancelled", "iterations": 0}] * 2
