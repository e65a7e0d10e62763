"""Epoch-end checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds everything that makes a resumed run follow the straight run's
trajectory: model (parameters and buffers), optimizer state (momentum buffers, the Caffe
form's last LR), completed epochs and iterations, the wall clock, every process's RNG
states and the summary tracker. Data order needs no state: each epoch's shuffle is a
pure function of (seed, epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.files import atomic_write
from trainer import RunConfigError
from trainer.spec import RunSpec

__all__ = [
    "CHECKPOINT_NAME",
    "IGNORED_ON_RESUME",
    "check_compatible",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "checkpoint.pt"
FORMAT_VERSION = 1

# Spec fields that may change between a checkpoint and its resume without changing the
# trajectory of the iterations still to run.
IGNORED_ON_RESUME = frozenset(
    {
        "eval_every",
        "target_accuracy",
        "divergence_factor",
        "checkpoint",
        "device",
        "data_root",
        "compile",
        "noise_every",  # measuring (trainer/noise.py, trainer/health.py) changes no update
        "health_every",
    }
)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (a resume after kill -9 finds the
    previous checkpoint or this one)."""
    atomic_write(path, lambda fh: torch.save({"format": FORMAT_VERSION, **state}, fh))


def load_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None when there is none."""
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return state


def check_compatible(saved_spec: dict[str, Any], spec: RunSpec, path: str | Path) -> None:
    """Refuse to resume a checkpoint written for a different run."""
    current = spec.model_dump(mode="json")
    differ = sorted(
        k
        for k in set(current) | set(saved_spec)
        if k not in IGNORED_ON_RESUME
        and current.get(k) != saved_spec.get(k)
        and not (k == "epochs" and _extends(saved_spec.get(k), current.get(k)))
    )
    if differ:
        details = ", ".join(f"{k}: {saved_spec.get(k)!r} -> {current.get(k)!r}" for k in differ)
        raise RunConfigError(
            f"{path} was written for a different spec ({details}); resume with the same "
            "spec, or start over (resume=False / --no-resume)"
        )


def _extends(saved: Any, current: Any) -> bool:
    """More epochs than the checkpoint's spec: "train N more epochs" (POST
    /api/runs/{id}/extend) continues the same trajectory; the iterations already run do
    not depend on where training ends (a cosine decay is stretched from here on)."""
    return isinstance(saved, int) and isinstance(current, int) and current > saved


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and every CUDA device)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
