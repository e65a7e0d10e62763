"""bench/gpu_check.sh cannot rot: its --cpu-dry-run runs every step on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("pytest-gpu", "e2e-worker", "ddp", "throughput", "resnet50-bf16")


@pytest.mark.slow
def test_gpu_check_cpu_dry_run(tmp_path: Path) -> None:
    report = tmp_path / "gpu.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHLAB_", "CUDA_"))}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    out = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu-dry-run", "--out", str(report)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    text = report.read_text()
    assert text.startswith("# GPU check (CPU dry run")
    for step in STEPS:
        assert f"| {step} | ok |" in text, text
    assert "| 32 |" in text and "x |" in text  # the trainer / plain loop ratio row
    assert "bf16, batch 2, cpu:" in text and "images/s" in text
    assert '"status": "succeeded"' in text and '"ddp_status": "succeeded"' in text
    # The recorded GPU figures are never touched by a dry run.
    assert "docs/benchmarks/gpu.md" not in out.stderr
