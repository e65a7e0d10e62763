"""Which GPUs this machine has, and how ``batchlab worker`` splits them into workers.

Pure planning, no processes started and no torch import when ``nvidia-smi`` answers:
the supervisor stays light and its children are the ones that initialise CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

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
    gpus: Sequence[str], *, group: bool = False, extra_queues: Sequence[str] = ()
) -> list[WorkerPlan]:
    """One worker per GPU on queue ``gpu``; with ``group``, one worker owning all of
    them on ``gpuN`` (runs with nproc=N launch torchrun there); no GPU: one CPU worker.

    Every worker gets ``CUDA_VISIBLE_DEVICES`` set: the CPU worker to "" so a run with
    ``device="auto"`` it takes really stays on the CPU.
    """
    extra = tuple(q for q in extra_queues if q)
    if not gpus:
        return [
            WorkerPlan(
                f"{CPU_QUEUE}@%h", (), _dedupe((CPU_QUEUE, *extra)), {"CUDA_VISIBLE_DEVICES": ""}
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
