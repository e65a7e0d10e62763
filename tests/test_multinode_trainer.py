"""Several nodes == one node == k virtual workers; nodes with separate run folders resume
from one checkpoint.

Each "node" is a real torchrun agent (``--nnodes 2``, c10d rendezvous on loopback, the
worker's flags) with its own ``BATCHLAB_HOME`` and run folder, as on separate machines.
Its processes call ``trainer.fit`` (gloo on CPU); global rank 0, on whichever node the
rendezvous put it, writes the metrics. The virtual side and the comparison are
tests/test_ddp.py's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from support import free_port, stop_process_groups
from test_ddp import REL_TOL, STEPS, compare, make_spec, rel, run_virtual

from trainer.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from trainer.sink import read_jsonl
from trainer.spec import RunSpec

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT_S = 150

# One training process: what worker.ddp_entry does, with a JSONL sink on global rank 0.
CHILD = """
import json, os, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from trainer import fit
from trainer.distributed import exit_worker_process
from trainer.sink import JsonlSink, NullSink
from trainer.spec import RunSpec
spec = RunSpec.model_validate_json(Path(sys.argv[1]).read_text())
out, rank = Path(sys.argv[2]), int(os.environ["RANK"])
sink = JsonlSink(out / "metrics.jsonl") if rank == 0 else NullSink()
result = fit(spec, sink, run_dir=out)
done = {"status": result.status, "iterations": result.iterations}
(out / f"result{rank}.json").write_text(json.dumps(done))
exit_worker_process(0)
"""


pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


def node_command(spec: RunSpec, spec_file: Path, run_dir: Path, port: int, host: bool) -> list:
    """A batchlab worker's torchrun line for one node (join_timeout: fail, not hang)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.nproc),
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", f"test-{port}", "--rdzv-conf", f"is_host={int(host)},join_timeout=60",
        "--local-addr", "127.0.0.1", "--max-restarts", "0",
        "--no-python", sys.executable, "-c", CHILD, str(spec_file), str(run_dir),
    ]  # fmt: skip


def launch_nodes(spec: RunSpec, run_dirs: list[Path]) -> tuple[list[int | None], str]:
    """Start one torchrun agent per run folder; their exit codes and output tails."""
    spec_file = run_dirs[0].parent / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    port = free_port()
    procs, logs = [], []
    for node, run_dir in enumerate(run_dirs):
        run_dir.mkdir(parents=True, exist_ok=True)
        home = run_dir.parent / f"{run_dir.name}-home"  # each node's own BATCHLAB_HOME
        env = {
            **os.environ,
            "BATCHLAB_HOME": str(home),
            "OMP_NUM_THREADS": "1",
            "BATCHLAB_COLLECTIVE_TIMEOUT_S": "60",  # a broken agreement fails, not hangs
            "PYTHONPATH": str(ROOT),
        }
        log = run_dir.parent / f"{run_dir.name}.log"
        logs.append(log)
        with log.open("w") as fh:
            procs.append(
                subprocess.Popen(
                    node_command(spec, spec_file, run_dir, port, host=node == 0),
                    cwd=ROOT,
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip
            )
    try:
        for p in procs:
            p.wait(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        stop_process_groups(procs)
    output = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    return [p.returncode for p in procs], output


def run_nodes(spec: RunSpec, run_dirs: list[Path]) -> list[dict[str, Any]]:
    """Train ``spec`` on one torchrun agent per run folder; every rank's result, by rank."""
    codes, output = launch_nodes(spec, run_dirs)
    assert codes == [0] * len(run_dirs), output
    results = {
        int(f.stem.removeprefix("result")): json.loads(f.read_text())
        for run_dir in run_dirs
        for f in run_dir.glob("result*.json")
    }
    assert sorted(results) == list(range(spec.processes)), output
    return [results[r] for r in range(spec.processes)]


def rank0_dir(run_dirs: list[Path]) -> Path:
    """The node folder global rank 0 wrote its metrics into (the rendezvous chooses)."""
    holders = [d for d in run_dirs if (d / "metrics.jsonl").exists()]
    assert len(holders) == 1, holders
    return holders[0]


def params_rel_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Largest relative difference of a floating-point model tensor (parameters, stats)."""
    return max(
        float((a["model"][k] - b["model"][k]).norm() / b["model"][k].norm())
        for k in b["model"]
        if b["model"][k].is_floating_point()
    )


def assert_same_checkpoint(run_dirs: list[Path], processes: int) -> dict[str, Any]:
    """Every node wrote its own copy of one state (with every process's RNG states)."""
    states = [load_checkpoint(d / CHECKPOINT_NAME) for d in run_dirs]
    first = states[0]
    assert first is not None and len(first["rng"]) == processes
    for other in states[1:]:
        assert other is not None
        assert other["iteration"] == first["iteration"]
        assert all(torch.equal(other["model"][k], v) for k, v in first["model"].items())
    return first


def meta_of(run_dir: Path) -> dict[str, Any]:
    """The run's ``sink.start`` meta (the first line; read_jsonl skips it)."""
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as fh:
        return json.loads(fh.readline())["meta"]


# 2 x 2 here (a node's processes reduce over loopback and across nodes at once); 2 x 1
# and 2 x 2 through batchlab workers: tests/test_multinode_worker.py (losses and LR).
@pytest.mark.parametrize(("nproc", "processes"), [pytest.param(2, 4, id="2x2")])
def test_two_nodes_match_virtual_workers(tmp_path: Path, nproc: int, processes: int) -> None:
    spec = make_spec(nodes=2, nproc=nproc)
    run_dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    results = run_nodes(spec, run_dirs)
    assert results == [{"status": "succeeded", "iterations": STEPS}] * processes
    main = rank0_dir(run_dirs)
    meta = meta_of(main)
    assert (meta["nodes"], meta["nproc"]) == (2, processes)
    assert meta["micro_batch"] == 8 * spec.workers // processes
    assert_same_checkpoint(run_dirs, processes)

    virtual = run_virtual(spec.model_copy(update={"nodes": 1, "nproc": 1}), tmp_path / "v")
    figures = compare(main, virtual, tmp_path / "v")
    assert max(figures.values()) < REL_TOL, figures


def test_nodes_resume_from_the_one_checkpoint_a_node_still_holds(tmp_path: Path) -> None:
    # Constant decay: the 1-epoch run extended to 2 follows the straight 2-epoch run.
    spec = make_spec(nodes=2, decay="constant", epochs=2)
    first = spec.model_copy(update={"epochs": 1})
    run_dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    half = STEPS // 2
    assert run_nodes(first, run_dirs) == [{"status": "succeeded", "iterations": half}] * 2
    assert_same_checkpoint(run_dirs, 2)

    # Global rank 0's node loses its folder's checkpoint: the state must come from the
    # other node, to rank 0 as well (the hardest case for a broadcast from "rank 0").
    lost = rank0_dir(run_dirs)
    (lost / CHECKPOINT_NAME).unlink()
    for d in run_dirs:
        (d / "metrics.jsonl").unlink(missing_ok=True)
    assert run_nodes(spec, run_dirs) == [{"status": "succeeded", "iterations": STEPS}] * 2

    main = rank0_dir(run_dirs)
    meta = meta_of(main)
    assert meta["resumed"] is True and meta["start_step"] == half
    rows = [r for r in read_jsonl(main / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(half, STEPS))

    straight = run_virtual(spec.model_copy(update={"nodes": 1}), tmp_path / "v")
    assert [r["train_err"] for r in rows] == straight.series("train_err")[half:]
    losses = straight.series("loss")[half:]
    assert max(rel(r["loss"], v) for r, v in zip(rows, losses, strict=True)) < REL_TOL
    final = assert_same_checkpoint(run_dirs, 2)  # both folders hold the final state again
    assert final["iteration"] == STEPS
    reference = load_checkpoint(tmp_path / "v" / CHECKPOINT_NAME)
    assert reference is not None
    assert params_rel_diff(final, reference) < REL_TOL


def test_a_checkpoint_of_another_spec_on_one_node_fails_every_process_at_once(
    tmp_path: Path,
) -> None:
    spec = make_spec(nodes=2)
    run_dirs = [tmp_path / "node-a", tmp_path / "node-b"]
    for d, seed in zip(run_dirs, (spec.seed, spec.seed + 1), strict=True):
        # Only the spec and the iteration are read before the processes agree.
        saved = spec.model_copy(update={"seed": seed}).model_dump(mode="json")
        save_checkpoint(d / CHECKPOINT_NAME, {"spec": saved, "epoch": 1, "iteration": 5})
    t0 = time.monotonic()
    codes, output = launch_nodes(spec, run_dirs)
    # Both fail, well before the 60 s a process would wait in a collective for a peer.
    assert codes == [1, 1] and time.monotonic() - t0 < 45, output
    assert "was written for a different spec (seed: 6 -> 5)" in output, output
    assert "process 1's checkpoint: RunConfigError" in output or (
        "process 0's checkpoint: RunConfigError" in output
    ), output
