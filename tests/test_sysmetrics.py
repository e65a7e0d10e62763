"""System metrics: the process tree's CPU and memory, NVML's GPU figures (a fake pynvml),
the sampler's steps, and a real worker run that writes ``sys/cpu_percent`` and
``sys/mem_rss_mb`` points."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from store import db
from tests.test_worker import Service, WorkerProcess, point_counts, tiny_spec, worker_env
from worker import sysmetrics
from worker.sysmetrics import GpuProbe, ProcessTree, SystemSampler, visible_gpu_indices


class FakeNvml:
    """pynvml's calls that GpuProbe makes, on two fake devices."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 2, power: bool = True) -> None:
        self.count, self.power, self.shut = count, power, False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=[40, 80][h], memory=10)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(used=(h + 1) * 1024 * 1024 * 1024, total=0, free=0)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        if not self.power:
            raise self.NVMLError("Not Supported")
        return [150_000, 250_500][h]


def test_gpu_probe_reads_util_memory_and_power() -> None:
    nvml = FakeNvml()
    probe = GpuProbe(nvml, [0, 1])
    assert probe.sample() == {
        "sys/gpu_util": 60.0,
        "sys/gpu_mem_mb": 3072.0,
        "sys/gpu_power_w": 400.5,
    }
    # One GPU of the two, and a board without power readings: that key is left out.
    nvml.power = False
    assert GpuProbe(nvml, [1]).sample() == {"sys/gpu_util": 80.0, "sys/gpu_mem_mb": 2048.0}
    probe.close()
    assert nvml.shut


def test_gpu_probe_opens_through_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    probe = GpuProbe.open()
    assert probe is not None and probe.handles == [1]
    # No GPU visible to NVML, or an NVML that fails to start: no probe, no GPU keys.
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml(count=0))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert GpuProbe.open() is None
    broken = FakeNvml()
    broken.nvmlInit = lambda: (_ for _ in ()).throw(FakeNvml.NVMLError("no driver"))  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert GpuProbe.open() is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert GpuProbe.open() is None


def test_visible_gpu_indices() -> None:
    assert visible_gpu_indices(4, {}) == [0, 1, 2, 3]
    assert visible_gpu_indices(4, {"CUDA_VISIBLE_DEVICES": "2,3"}) == [2, 3]
    assert visible_gpu_indices(4, {"CUDA_VISIBLE_DEVICES": ""}) == []
    assert visible_gpu_indices(2, {"CUDA_VISIBLE_DEVICES": "GPU-1234"}) == [0, 1]


def test_process_tree_counts_its_children() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "x = bytearray(80 * 2**20); import time; time.sleep(30)"]
    )
    try:
        tree = ProcessTree(os.getpid())
        time.sleep(1.0)  # the child has allocated its 80 MB
        tree.sample()
        sample = tree.sample()
        own = ProcessTree(child.pid).sample()["sys/mem_rss_mb"]
        assert own > 80
        assert sample["sys/mem_rss_mb"] > own and sample["sys/cpu_percent"] >= 0
    finally:
        child.kill()
        child.wait()


def test_sampler_steps_follow_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    added: list[tuple[int, dict[str, float], float, float]] = []
    clock: list[tuple[int, float, float] | None] = [None]

    def add(step: int, values: dict[str, float], *, epoch: float, wall_time: float) -> None:
        added.append((step, values, epoch, wall_time))

    sampler = SystemSampler(add, lambda: clock[0], interval=3600, gpu=GpuProbe(FakeNvml(), [0]))
    sampler.sample_once()  # before the first iteration: step 0
    clock[0] = (41, 2.05, 12.5)
    sampler.sample_once()
    sampler.close()
    assert [(s, e, w) for s, _, e, w in added[1:]] == [(41, 2.05, 12.5)]
    assert added[0][0] == 0 and added[0][2] == 0.0
    keys = set(added[1][1])
    assert keys == {
        "sys/cpu_percent",
        "sys/mem_rss_mb",
        "sys/gpu_util",
        "sys/gpu_mem_mb",
        "sys/gpu_power_w",
    }
    assert sampler.samples == 2


def test_sampler_without_nvml_writes_cpu_and_memory_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    added: list[dict[str, float]] = []
    sampler = SystemSampler(lambda step, v, **kw: added.append(v), lambda: None, interval=0.05)
    deadline = time.monotonic() + 5
    while not added and time.monotonic() < deadline:
        time.sleep(0.02)
    sampler.close()
    assert sampler.gpu is None
    assert added and set(added[0]) == {"sys/cpu_percent", "sys/mem_rss_mb"}
    assert sysmetrics.SAMPLE_S == 2.0


# ---------------------------------------------------------------------------------------
# a real worker


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    home = tmp_path_factory.mktemp("sysmetrics-home")
    db.migrate(db.get_engine(f"sqlite:///{home / 'batchlab.db'}"))
    worker = WorkerProcess.launcher(worker_env(home), home / "worker.log", "--loglevel", "info")
    svc = Service(home, worker)
    try:
        yield svc
    finally:
        worker.stop()


@pytest.mark.slow
def test_worker_run_writes_system_metrics(service: Service) -> None:
    spec = tiny_spec(epochs=2000)  # stopped once samples are in
    run_id = service.submit(spec)
    service.wait(run_id, "running")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = point_counts(service.engine, run_id)
        if counts.get("sys/cpu_percent", 0) >= 2 and counts.get("loss"):
            break
        time.sleep(0.2)
    from store import runs

    with db.session(service.engine) as s:
        runs.request_cancel(s, run_id)
    run = service.wait(run_id, "cancelled", "succeeded", "failed", timeout=20)
    assert run.status == "cancelled", run.error
    counts = point_counts(service.engine, run_id)
    assert counts.get("sys/cpu_percent", 0) >= 2, counts
    assert counts.get("sys/mem_rss_mb", 0) >= 2, counts
    assert not any(k.startswith("sys/gpu") for k in counts)  # no GPU here
    import sqlalchemy as sa

    from store.models import MetricPoint

    with service.engine.connect() as conn:
        rss = conn.scalars(
            sa.select(MetricPoint.value).where(
                MetricPoint.run_id == run_id, MetricPoint.key == "sys/mem_rss_mb"
            )
        ).all()
    assert all(v > 50 for v in rss)  # a torch process: tens of MB at least
