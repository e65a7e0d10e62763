"""System metrics of a training run, sampled by the worker every ``SAMPLE_S`` seconds.

Keys (ordinary metric points of the run, written through its ``MetricWriter``):
``sys/cpu_percent`` (CPU of the training process tree, 100 = one core busy),
``sys/mem_rss_mb`` (resident memory of that tree), and with NVML and a GPU:
``sys/gpu_util`` (percent, mean over the run's GPUs), ``sys/gpu_mem_mb`` and
``sys/gpu_power_w`` (summed over them; device-wide figures, as nvidia-smi shows them).

A sample's step is the run's newest logged iteration (0 before the first), its epoch
and wall time those of that iteration advanced by the time since it was logged, so the
samples line up with the training curves on every x axis. Two samples at one iteration
(a slow one) keep the later, as any point rewritten at its step does.

The tree is the process that trains and its children (DataLoader workers); under
torchrun, rank 0 samples the torchrun agent's tree, which holds every rank.
NVML (PyPI ``nvidia-ml-py``, imported as ``pynvml``) is optional: absent, without a
driver or without a GPU, the GPU keys are simply not written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_S = 2.0
MB = 1024 * 1024

# (step, epoch, wall_time) of the run's newest point, or None before the first.
Clock = Callable[[], tuple[int, float, float] | None]
AddFn = Callable[..., None]


class ProcessTree:
    """CPU percent and RSS of a process and its descendants (psutil)."""

    def __init__(self, pid: int) -> None:
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self._procs: dict[int, Any] = {}

    def sample(self) -> dict[str, float]:
        psutil = self._psutil
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return {}
        cpu = rss = 0.0
        alive: dict[int, Any] = {}
        for p in procs:
            # The same Process object across samples: cpu_percent measures since the last.
            proc = self._procs.get(p.pid, p)
            try:
                with proc.oneshot():
                    cpu += proc.cpu_percent(None)
                    rss += proc.memory_info().rss
            except psutil.Error:
                continue
            alive[p.pid] = proc
        self._procs = alive
        return {"sys/cpu_percent": cpu, "sys/mem_rss_mb": rss / MB}


def visible_gpu_indices(count: int, env: dict[str, str] | None = None) -> list[int]:
    """NVML indices of the GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when it
    lists indices, else every device (UUIDs and MIG names: every device too)."""
    text = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES")
    if text is None:
        return list(range(count))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        return list(range(count))
    return [int(p) for p in parts if int(p) < count]


class GpuProbe:
    """Utilisation, memory and power of the run's GPUs through NVML."""

    def __init__(self, nvml: Any, indices: list[int]) -> None:
        self.nvml = nvml
        self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]

    @classmethod
    def open(cls) -> GpuProbe | None:
        """A probe, or None without pynvml, a driver or a visible GPU."""
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            indices = visible_gpu_indices(pynvml.nvmlDeviceGetCount())
            probe = cls(pynvml, indices)
        except Exception:  # pynvml.NVMLError and its many subclasses: no usable NVML
            return None
        if not probe.handles:
            probe.close()
            return None
        return probe

    def sample(self) -> dict[str, float]:
        nvml = self.nvml
        out: dict[str, float] = {}
        with contextlib.suppress(Exception):
            utils = [nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            out["sys/gpu_util"] = sum(utils) / len(utils)
        with contextlib.suppress(Exception):
            used = sum(nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)
            out["sys/gpu_mem_mb"] = used / MB
        with contextlib.suppress(Exception):  # not every board reports power
            mw = sum(nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles)
            out["sys/gpu_power_w"] = mw / 1000.0
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


class SystemSampler:
    """A thread that adds one sample of every available system metric per ``interval``."""

    def __init__(
        self,
        add: AddFn,
        clock: Clock,
        *,
        pid: int | None = None,
        interval: float = SAMPLE_S,
        gpu: GpuProbe | None | bool = True,
    ) -> None:
        self.add, self.clock, self.interval = add, clock, interval
        self.samples = 0
        try:
            self.tree: ProcessTree | None = ProcessTree(pid or os.getpid())
        except Exception:  # psutil missing or the process gone: no CPU / memory keys
            log.warning("system metrics: cannot watch process %s", pid, exc_info=True)
            self.tree = None
        self.gpu = GpuProbe.open() if gpu is True else (gpu or None)
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sysmetrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        if self.tree is not None:
            self.tree.sample()  # primes cpu_percent: the first reading is always 0
        while not self._stop.wait(self.interval):
            try:
                self.sample_once()
            except Exception:
                log.warning("system metrics: a sample failed", exc_info=True)

    def sample_once(self) -> None:
        values: dict[str, float] = {}
        if self.tree is not None:
            values.update(self.tree.sample())
        if self.gpu is not None:
            values.update(self.gpu.sample())
        if not values:
            return
        at = self.clock()
        if at is None:  # before the first iteration: step 0, wall time since start
            step, epoch, wall = 0, 0.0, time.monotonic() - self._started
        else:
            step, epoch, wall = at
        self.add(step, values, epoch=epoch, wall_time=wall)
        self.samples += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.gpu is not None:
            self.gpu.close()
