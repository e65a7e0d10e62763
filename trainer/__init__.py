"""batchlab trainer: the large-minibatch training loop of Goyal et al. 2017.

Importing ``trainer`` (or ``trainer.spec``, ``trainer.schedule``, ``trainer.sink``)
does not import torch: the API server validates specs and draws schedules without it.
``trainer.fit`` and ``trainer.FitResult`` load the loop (and torch) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trainer.loop import FitResult, fit

__all__ = ["FitResult", "RunConfigError", "fit"]


class RunConfigError(ValueError):
    """A run cannot start as configured (the message names the field and the reason).

    Raised by ``fit`` before training for problems RunSpec alone cannot see: the data's
    real size, the device, torchrun's process count, a checkpoint of another spec.
    """


def __getattr__(name: str) -> Any:
    if name in ("FitResult", "fit"):
        from trainer import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'trainer' has no attribute {name!r}")
