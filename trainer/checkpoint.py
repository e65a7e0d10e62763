"""Epoch-end checkpoints: written atomically, read back with ``weights_only=True``.

A checkpoint holds everything that makes a resumed run follow the straight run's
trajectory: model (parameters and buffers), optimizer state (momentum buffers, the Caffe
form's last LR), completed epochs and iterations, the wall clock, every process's RNG
states and the summary tracker. Data order needs no state: each epoch's shuffle is a
pure function of (seed, epoch).

Several nodes do not share a folder: the first process of every node writes the
checkpoint into its node's own run folder (each holds every process's RNG states). On
resume the processes agree on one state (:func:`agree_on_checkpoint`): the newest any of
them holds, sent to the others when they do not all hold it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from core.files import atomic_write
from trainer import RunConfigError
from trainer.spec import RunSpec

if TYPE_CHECKING:
    from trainer.distributed import DistContext

__all__ = [
    "CHECKPOINT_NAME",
    "IGNORED_ON_RESUME",
    "agree_on_checkpoint",
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


def agree_on_checkpoint(
    path: Path | None, spec: RunSpec, ctx: DistContext
) -> dict[str, Any] | None:
    """The one checkpoint every process resumes from (None: all start afresh).

    Each process reads its own node's ``path`` and checks it against ``spec``. In one
    process that is the answer, with no collective. Otherwise the processes exchange
    (iteration or -1, error): any error fails every process (the one that hit it raises
    its own exception, the others a ``RunConfigError`` naming it) instead of leaving them
    in the next collective; else the newest iteration wins, and when not every process
    holds it, the lowest rank that does broadcasts its state (a node that lost its
    folder, or whose last checkpoint is older, resumes from a peer's).
    """
    state, error = None, None
    try:
        state = load_checkpoint(path) if path is not None else None
        if state is not None:
            check_compatible(state["spec"], spec, path)  # type: ignore[arg-type]
    except Exception as exc:
        if not ctx.distributed:
            raise
        error = exc
    if not ctx.distributed:
        return state
    import torch.distributed as dist

    mine = (int(state["iteration"]) if state is not None else -1, _one_line(error))
    seen: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(seen, mine)
    for rank, (_, message) in enumerate(seen):
        if message is not None:
            if error is not None:
                raise error
            raise RunConfigError(f"process {rank}'s checkpoint: {message}")
    iterations = [it for it, _ in seen]
    newest = max(iterations)
    if all(it == newest for it in iterations):
        return state  # every process holds the same state (or none has one)
    holder = iterations.index(newest)
    box = [state if ctx.rank == holder else None]
    dist.broadcast_object_list(box, src=holder)
    return box[0]


def _one_line(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


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
