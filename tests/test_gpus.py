"""A worker proves its device before it takes work (worker.gpus.probe_devices).

The refusal is exercised for real on this machine's CPU build of torch (a GPU worker is
started and must exit with the explanation); CUDA builds are faked, in-process by
monkeypatching torch.cuda, and in a child process by a stand-in ``torch`` module.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from worker.gpus import DeviceReport, GpuInfo, plan_workers, probe_devices
from worker.launch import DeviceCheckError, prove_devices

ROOT = Path(__file__).resolve().parent.parent
BATCHLAB = [sys.executable, "-m", "batchlab.cli"]  # as `batchlab`, from this checkout
H200_BYTES = 150_000_000_000  # torch reports 139.7 GiB for an H200
cpu_build_only = pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU torch")

FAKE_TORCH = """\
# A stand-in for a CUDA build of torch that sees ONE GPU, for the probe's child process.
from types import SimpleNamespace
__version__ = "2.13.0+cu128"
version = SimpleNamespace(cuda="12.8")
cuda = SimpleNamespace(
    is_available=lambda: True,
    device_count=lambda: 1,
    get_device_properties=lambda i: SimpleNamespace(name="NVIDIA H200", total_memory={mem}),
)
"""


def _worker_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHLAB_", "CUDA_"))}
    return {**env, "BATCHLAB_HOME": str(home), **extra}


def _fake_cuda(monkeypatch: pytest.MonkeyPatch, count: int, *, available: bool = True) -> None:
    monkeypatch.setattr(torch, "__version__", "2.13.0+cu128")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    props = SimpleNamespace(name="NVIDIA H200", total_memory=H200_BYTES)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)


# --- on this machine's real CPU build ---------------------------------------------------
@cpu_build_only
def test_gpu_worker_on_a_cpu_build_refuses_to_start(tmp_path: Path) -> None:
    """The issue's reproduction: CUDA_VISIBLE_DEVICES=0 used to start `gpu0@...` on the CPU."""
    home = tmp_path / "home"
    out = subprocess.run(
        [*BATCHLAB, "worker", "--gpus", "0"],
        env=_worker_env(home, CUDA_VISIBLE_DEVICES="0"),
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out
    assert f"asked for GPU 0 but torch {torch.__version__} has no CUDA" in out.stderr
    assert "TORCH_INDEX_URL" in out.stderr and "--gpus none" in out.stderr
    # No Celery worker started and the broker was never opened: nothing consumed.
    assert "started" not in out.stderr + out.stdout
    assert not (home / "broker.db").exists()


@cpu_build_only
def test_launcher_probe_on_the_real_cpu_build() -> None:
    report = prove_devices(["0"])
    assert not report.ok and report.gpus == () and report.cuda_version is None
    assert report.torch_version == torch.__version__
    assert report.describe() == f"cpu ({report.cpu_cores} cores), torch {torch.__version__}"


def test_cpu_worker_probe_is_ok_and_describes_the_cpu() -> None:
    report = probe_devices([])
    assert report.ok and report.expected == () and report.cpu_cores >= 1
    assert report.describe() == f"cpu ({report.cpu_cores} cores), torch {torch.__version__}"


# --- faked CUDA builds ------------------------------------------------------------------
def test_happy_path_describes_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1)
    report = probe_devices(["3"])  # CUDA_VISIBLE_DEVICES=3: torch numbers it cuda:0
    assert report.ok, report.error
    assert report.gpus == (GpuInfo(0, "NVIDIA H200", H200_BYTES),)
    assert report.describe() == "cuda:0 NVIDIA H200 (139 GiB), torch 2.13.0+cu128, CUDA 12.8"
    assert DeviceReport.from_dict(report.to_dict()) == report
    assert report.to_dict()["describe"] == report.describe()


def test_count_mismatch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 1)
    report = probe_devices(["0", "1"])
    assert not report.ok
    assert report.error is not None
    assert report.error.startswith("asked for GPUs 0,1 but torch sees 1 GPU (cuda:0 NVIDIA H200")
    assert "check CUDA_VISIBLE_DEVICES and --gpus" in report.error


def test_cuda_build_without_a_visible_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_cuda(monkeypatch, 0, available=False)
    report = probe_devices(["0"])
    assert report.error is not None
    assert "torch 2.13.0+cu128 (CUDA 12.8) sees no GPU" in report.error
    assert "nvidia-smi" in report.error and "--gpus none" in report.error


def test_worker_cli_refuses_a_count_mismatch(tmp_path: Path) -> None:
    """`batchlab worker --gpus 0,1` when the (stand-in) CUDA torch sees one GPU."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "torch.py").write_text(FAKE_TORCH.format(mem=H200_BYTES))
    env = _worker_env(tmp_path / "home", CUDA_VISIBLE_DEVICES="0,1", PYTHONPATH=str(fake))
    out = subprocess.run(
        [*BATCHLAB, "worker", "--gpus", "0,1"],
        env=env,
        capture_output=True,
        cwd=ROOT,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out
    assert "asked for GPUs 0,1 but torch sees 1 GPU" in out.stderr
    # The stand-in seeing the right count passes the launcher's check.
    report = prove_devices(["0"], env=env)
    assert report.ok and report.describe().startswith("cuda:0 NVIDIA H200 (139 GiB)")


def test_a_probe_that_crashes_is_an_error_not_a_report(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('libcudart.so.12: cannot open')\n")
    env = {**os.environ, "PYTHONPATH": str(broken)}
    with pytest.raises(DeviceCheckError, match=r"probe failed \(exit 1\).*libcudart"):
        prove_devices(["0"], env=env)


# --- node names (issue 10, point 10) -------------------------------------------------------
def test_cpu_node_names_are_unique_per_supervisor(tmp_path: Path) -> None:
    (plan,) = plan_workers([], tag="4711")
    assert plan.name == "cpu-4711@%h" and plan.label == "cpu-4711"
    # GPU workers are named after their GPU, unique on a host already.
    assert [p.name for p in plan_workers(["0", "1"], tag="4711")] == ["gpu0@%h", "gpu1@%h"]
    names = []
    for _ in range(2):  # two `batchlab worker --gpus none` on one host
        out = subprocess.run(
            [*BATCHLAB, "worker", "--gpus", "none", "--dry-run"],
            env=_worker_env(tmp_path / "home"),
            capture_output=True,
            cwd=ROOT,
            text=True,
            timeout=60,
            check=True,
        )
        names += re.findall(r"--hostname (\S+)", out.stdout)
    assert len(names) == 2 and names[0] != names[1]
    assert all(re.fullmatch(r"cpu-\d+@%h", n) for n in names)


# --- on a real GPU (bench/gpu_check.sh; skipped without CUDA) -----------------------------
@pytest.mark.gpu
def test_probe_on_a_real_gpu() -> None:
    report = prove_devices(["0"])
    assert report.ok, report.error
    assert report.cuda_version == torch.version.cuda and len(report.gpus) == 1
    assert report.describe().startswith("cuda:0 ") and f"CUDA {torch.version.cuda}" in (
        report.describe()
    )


@pytest.mark.gpu
def test_a_gpu_id_cuda_cannot_see_is_refused_on_a_real_gpu() -> None:
    # CUDA stops reading CUDA_VISIBLE_DEVICES at the first id that does not exist.
    report = prove_devices(["0", "99"])
    assert report.error is not None
    assert report.error.startswith("asked for GPUs 0,99 but torch sees 1 GPU (cuda:0 ")
