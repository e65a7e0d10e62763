"""Which GPUs this machine has, how ``batchlab worker`` splits them into workers, and
the probe that proves torch sees exactly the GPUs a worker was given.

Planning starts no processes and imports no torch when ``nvidia-smi`` answers: the
supervisor stays light and its children are the ones that initialise CUDA. The probe
(``probe_devices``) imports torch; the supervisor runs it in a child process
(``python -m worker.gpus --expect 0,1``, see ``worker.launch.prove_devices``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from worker.celery_app import CPU_QUEUE, GPU_QUEUE

_SMI_LINE = re.compile(r"^GPU (\d+):")
NO_GPU_WORDS = ("none", "cpu", "")


@dataclass(frozen=True)
class WorkerPlan:
    """One Celery worker process to start: its node name, GPUs and queues."""

    name: str  # Celery node name; %h becomes the host name
    gpus: tuple[str, ...]
    queues: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.name.split("@", 1)[0]


def detect_gpus() -> list[str]:
    """GPU ids usable here: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``,
    else ``torch.cuda.device_count()``; [] when there are none."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        ids = [x.strip() for x in env.split(",") if x.strip()]
        # CUDA stops at the first invalid entry; "-1" is the usual way to say none.
        return [] if not ids or ids[0].startswith("-") else ids
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0:
            return [m.group(1) for ln in out.stdout.splitlines() if (m := _SMI_LINE.match(ln))]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def parse_gpus(arg: str, available: Sequence[str]) -> list[str]:
    """``--gpus all|none|0,1`` against the GPUs found; ValueError naming ``--gpus``."""
    text = arg.strip().lower()
    if text == "all":
        return list(available)
    if text in NO_GPU_WORDS:
        return []
    wanted = [x.strip() for x in arg.split(",") if x.strip()]
    if len(set(wanted)) != len(wanted):
        raise ValueError(f"--gpus: {arg!r} names a GPU twice")
    missing = [g for g in wanted if g not in available]
    if missing:
        found = ", ".join(available) if available else "none"
        raise ValueError(f"--gpus: GPU {', '.join(missing)} not found (visible GPUs: {found})")
    return wanted


def plan_workers(
    gpus: Sequence[str], *, group: bool = False, extra_queues: Sequence[str] = (), tag: str = ""
) -> list[WorkerPlan]:
    """One worker per GPU on queue ``gpu``; with ``group``, one worker owning all of
    them on ``gpuN`` (runs with nproc=N launch torchrun there); no GPU: one CPU worker.

    Every worker gets ``CUDA_VISIBLE_DEVICES`` set: the CPU worker to "" so a run with
    ``device="auto"`` it takes really stays on the CPU. Node names must be unique per
    host (the workers table is keyed by them): a GPU worker is named after its GPU, a
    CPU worker after ``tag`` (``batchlab worker`` passes its pid), since several CPU
    workers may share a host.
    """
    extra = tuple(q for q in extra_queues if q)
    if not gpus:
        label = f"{CPU_QUEUE}-{tag}" if tag else CPU_QUEUE
        return [
            WorkerPlan(
                f"{label}@%h", (), _dedupe((CPU_QUEUE, *extra)), {"CUDA_VISIBLE_DEVICES": ""}
            )
        ]
    if group and len(gpus) > 1:
        label = "gpu" + "-".join(_short(g) for g in gpus)
        queue = f"{GPU_QUEUE}{len(gpus)}"
        return [
            WorkerPlan(
                f"{label}@%h",
                tuple(gpus),
                _dedupe((queue, *extra)),
                {"CUDA_VISIBLE_DEVICES": ",".join(gpus)},
            )
        ]
    return [
        WorkerPlan(
            f"gpu{_short(g)}@%h", (g,), _dedupe((GPU_QUEUE, *extra)), {"CUDA_VISIBLE_DEVICES": g}
        )
        for g in gpus
    ]


def _short(gpu: str) -> str:
    """A node-name-safe label for a GPU id (indices as they are, UUIDs shortened)."""
    return gpu if gpu.isdigit() else re.sub(r"[^A-Za-z0-9]", "", gpu)[-8:]


def _dedupe(queues: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(queues))


# --- the device probe -------------------------------------------------------------------
GIB = 2**30
PROBE_MISMATCH = 3  # exit code of ``python -m worker.gpus`` when the devices do not match
HOW_TO_GET_CUDA = (
    "install a CUDA build of torch (README 'GPUs'); in Docker, build the image with a "
    "CUDA index (TORCH_INDEX_URL, see README 'Docker Compose')"
)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # as torch numbers it, inside CUDA_VISIBLE_DEVICES
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class DeviceReport:
    """What torch sees in this process, against the GPUs the worker was given."""

    torch_version: str
    cuda_version: str | None  # None: a torch build without CUDA
    cpu_cores: int
    expected: tuple[str, ...] = ()  # GPU ids given to the worker; () for a CPU worker
    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None  # why the devices do not match, with how to fix it

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe(self) -> str:
        """E.g. "cuda:0 NVIDIA H200 (139 GiB), torch 2.13.0+cu128, CUDA 12.8"."""
        if not self.gpus:
            return f"cpu ({self.cpu_cores} cores), torch {self.torch_version}"
        cards = ", ".join(
            f"cuda:{g.index} {g.name} ({g.memory_bytes // GIB} GiB)" for g in self.gpus
        )
        return f"{cards}, torch {self.torch_version}, CUDA {self.cuda_version}"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "describe": self.describe()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceReport:
        return cls(
            torch_version=data["torch_version"],
            cuda_version=data["cuda_version"],
            cpu_cores=data["cpu_cores"],
            expected=tuple(data["expected"]),
            gpus=tuple(GpuInfo(**g) for g in data["gpus"]),
            error=data["error"],
        )


def probe_devices(expected: Sequence[str] = ()) -> DeviceReport:
    """What torch sees here, and whether it is exactly the ``expected`` GPUs (ids as
    ``CUDA_VISIBLE_DEVICES`` lists them; () for a CPU worker). Cheap: no CUDA kernel,
    no allocation, only the device count and properties."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report = DeviceReport(str(torch.__version__), torch.version.cuda, cores or 1, tuple(expected))
    if not expected:
        return report
    asked = f"asked for GPU{'s' if len(expected) > 1 else ''} {','.join(expected)}"
    cpu_instead = "or start a CPU worker with --gpus none"
    if report.cuda_version is None:
        why = f"torch {report.torch_version} has no CUDA: {HOW_TO_GET_CUDA}; {cpu_instead}"
        return replace(report, error=f"{asked} but {why}")
    if not torch.cuda.is_available():
        why = (
            f"torch {report.torch_version} (CUDA {report.cuda_version}) sees no GPU: check the "
            "NVIDIA driver with nvidia-smi (in Docker: the NVIDIA Container Toolkit and "
            f"docker-compose.gpu.yml); {cpu_instead}"
        )
        return replace(report, error=f"{asked} but {why}")
    gpus = tuple(
        GpuInfo(i, str(props.name), int(props.total_memory))
        for i in range(torch.cuda.device_count())
        for props in (torch.cuda.get_device_properties(i),)
    )
    report = replace(report, gpus=gpus)
    if len(gpus) != len(expected):
        seen = f"{len(gpus)} GPU{'' if len(gpus) == 1 else 's'}"
        why = f"torch sees {seen} ({report.describe()}): check CUDA_VISIBLE_DEVICES and --gpus"
        return replace(report, error=f"{asked} but {why}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m worker.gpus --expect 0,1``: the probe as JSON; exit 3 on a mismatch."""
    ap = argparse.ArgumentParser(prog="python -m worker.gpus", description=main.__doc__)
    ap.add_argument("--expect", default="", metavar="0,1", help="GPU ids; empty: CPU")
    args = ap.parse_args(argv)
    report = probe_devices([g for g in args.expect.split(",") if g.strip()])
    print(json.dumps(report.to_dict()))
    return 0 if report.ok else PROBE_MISMATCH


if __name__ == "__main__":
    sys.exit(main())
