"""Optimizers of a run: SGD in the PyTorch or the Caffe momentum form, LARS, LAMB.

Goyal et al. 2017, Remark 1: weight decay is a gradient term, ``g <- g + lambda * w``,
applied to conv/linear weights only (not to normalization gamma/beta nor biases, unless
``spec.weight_decay_norm``). Remark 2: momentum SGD comes in two forms,

    PyTorch  u <- m u + g;          w <- w - lr u
    Caffe    v <- m v + lr g;       w <- w - v

which are the same only while the LR is constant. With the *momentum correction*
``v <- m (lr_t / lr_{t-1}) v + lr_t g`` the Caffe form equals the PyTorch form for every
schedule (v = lr u by induction); without it, each LR change leaves the buffer scaled for
the old LR. The LR itself is set every iteration by the loop (:func:`set_lr`) from the
run's ``trainer.schedule.Schedule``; no torch LR scheduler is involved.

LARS (You et al. 2017) and LAMB (You et al. 2019) come from pytorch-optimizer. As in the
papers and their common use, only conv/linear weights are layer-wise adapted (trust
ratio) and decayed; normalization parameters and biases take the plain step of the base
method (momentum SGD for LARS, Adam's m/(sqrt(v)+eps) for LAMB), without decay unless
``spec.weight_decay_norm``. See :func:`layerwise_optimizer` and docs/lars.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from trainer.norms import NORM_LAYER_TYPES
from trainer.schedule import Schedule
from trainer.spec import RunSpec

__all__ = ["CaffeSGD", "build_optimizer", "decay_groups", "layerwise_optimizer", "set_lr"]


def _split_norm_and_bias(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, norm parameters + biases) among ``model``'s trainable parameters.

    Norm parameters are those owned directly by a module of ``NORM_LAYER_TYPES`` (BN
    gamma/beta, FRN's tau, ...); biases are parameters named ``bias`` anywhere.
    """
    norm_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, NORM_LAYER_TYPES)
        for p in m.parameters(recurse=False)
    }
    weights: list[nn.Parameter] = []
    norm_and_bias: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = id(p) in norm_ids or name.rsplit(".", 1)[-1] == "bias"
        (norm_and_bias if skip else weights).append(p)
    return weights, norm_and_bias


def decay_groups(
    model: nn.Module, weight_decay: float, *, decay_norm_and_bias: bool = False
) -> list[dict]:
    """Parameter groups: decayed weights, and norm parameters + biases without decay.

    See :func:`_split_norm_and_bias` for which parameters are which. Empty groups are
    left out.
    """
    weights, norm_and_bias = _split_norm_and_bias(model)
    if decay_norm_and_bias:
        weights, norm_and_bias = weights + norm_and_bias, []
    groups = [
        {"params": weights, "weight_decay": weight_decay},
        {"params": norm_and_bias, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def layerwise_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    *,
    weight_decay: float,
    decay_norm_and_bias: bool = False,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """pytorch-optimizer's LARS or Lamb with norm parameters and biases not adapted.

    Two groups: conv/linear weights (trust ratio and weight decay), and norm parameters +
    biases (no trust ratio; decayed only with ``decay_norm_and_bias``, which LARS cannot
    do). How each library class is made to follow that:

    - ``Lamb`` applies its trust ratio ||w|| / ||r + wd w|| to every tensor unless the
      group sets ``adam=True``: the norm/bias group does. ``weight_decouple=False`` puts
      the decay into the update whose norm the trust ratio divides by, after the moments,
      which is the paper's Algorithm 2 (the library's default instead shrinks w by
      ``1 - lr wd`` outside the trust ratio, as AdamW). ``adam_debias=True`` stops the
      library dividing the *step* by ``1 - beta1^t`` outside the trust ratio (10x the LR
      at step 1, not in the paper); m and v are then both uncorrected, whose scalars
      cancel in the trust ratio of adapted tensors, and norm/bias tensors take Adam's
      step without bias correction (as BERT's AdamWeightDecay).
    - ``LARS`` has no per-group switch: it adapts and decays exactly the tensors with
      ``ndim > 1`` and steps the others by plain momentum SGD without decay. The split
      is checked to coincide with that rule, so a 2-D norm parameter or a 1-D weight
      cannot be treated the wrong way silently.
    """
    import pytorch_optimizer

    weights, norm_and_bias = _split_norm_and_bias(model)
    if name == "lamb":
        nb_decay = weight_decay if decay_norm_and_bias else 0.0
        groups = [
            {"params": weights, "weight_decay": weight_decay},
            {"params": norm_and_bias, "weight_decay": nb_decay, "adam": True},
        ]
        return pytorch_optimizer.Lamb(
            [g for g in groups if g["params"]], lr=lr, weight_decouple=False, adam_debias=True
        )
    if name == "lars":
        if decay_norm_and_bias and weight_decay and norm_and_bias:
            raise ValueError(
                "weight_decay_norm: pytorch-optimizer's LARS never decays normalization "
                "parameters or biases (1-D tensors); use optimizer sgd or lamb for it"
            )
        wrong = [tuple(p.shape) for p in weights if p.ndim <= 1] + [
            tuple(p.shape) for p in norm_and_bias if p.ndim > 1
        ]
        if wrong:
            raise ValueError(
                "optimizer: LARS adapts exactly the tensors with ndim > 1, but the "
                f"parameters of shapes {wrong} are on the other side of the "
                "weights / norm-and-bias split"
            )
        groups = [
            {"params": weights, "weight_decay": weight_decay},
            {"params": norm_and_bias, "weight_decay": 0.0},
        ]
        return pytorch_optimizer.LARS(
            [g for g in groups if g["params"]], lr=lr, momentum=momentum, nesterov=nesterov
        )
    raise ValueError(f"optimizer: {name!r} is not a layer-wise optimizer (lars, lamb)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` for the next ``step`` of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


class CaffeSGD(torch.optim.Optimizer):
    """Momentum SGD with the LR inside the buffer (Caffe / Goyal et al. eq. 10).

    ``v <- m c v + lr (g + wd w);  w <- w - v`` where ``c = lr / lr_prev`` with momentum
    correction (Remark 2) and 1 without. Nesterov: ``w <- w - (lr g' + m v)`` with the new
    v, which equals PyTorch's Nesterov step under the correction. Updates use the
    vectorised ``torch._foreach_*`` kernels, one call per operation for all parameters.
    The LR of the previous step is kept in each group as ``last_lr`` (so it is saved in
    the optimizer's state dict and a resumed run corrects the first step exactly).
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        momentum_correction: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "momentum_correction": momentum_correction,
            "last_lr": None,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, m, wd = group["lr"], group["momentum"], group["weight_decay"]
            grads = [p.grad for p in params]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)  # Remark 1: g + wd*w
            last = group["last_lr"]
            ratio = lr / last if group["momentum_correction"] and last else 1.0
            group["last_lr"] = lr
            if m == 0:
                torch._foreach_add_(params, grads, alpha=-lr)
                continue
            old, new = [], []
            for p, g in zip(params, grads, strict=True):
                state = self.state[p]
                if "momentum_buffer" in state:
                    old.append((state["momentum_buffer"], g))
                else:
                    # First step: v = lr * g, as PyTorch starts its buffer at u = g.
                    state["momentum_buffer"] = torch.mul(g, lr)
                    new.append(state["momentum_buffer"])
            if old:
                bufs = [b for b, _ in old]
                torch._foreach_mul_(bufs, m * ratio)
                torch._foreach_add_(bufs, [g for _, g in old], alpha=lr)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if group["nesterov"]:
                update = torch._foreach_mul(grads, lr)
                torch._foreach_add_(update, bufs, alpha=m)
                torch._foreach_sub_(params, update)
            else:
                torch._foreach_sub_(params, bufs)
        return loss


def build_optimizer(model: nn.Module, spec: RunSpec) -> torch.optim.Optimizer:
    """The optimizer ``spec`` asks for, over ``model``'s parameters, at the LR of step 0."""
    lr0 = Schedule.from_spec(spec).lr(0)
    if spec.optimizer == "sgd":
        groups = decay_groups(model, spec.weight_decay, decay_norm_and_bias=spec.weight_decay_norm)
        if spec.momentum_form == "pytorch":
            # PyTorch's SGD is Remark 2's reference form with weight decay as g + wd*w.
            return torch.optim.SGD(
                groups, lr=lr0, momentum=spec.momentum, nesterov=spec.nesterov, foreach=True
            )
        return CaffeSGD(
            groups,
            lr=lr0,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            momentum_correction=spec.momentum_correction,
        )
    if spec.optimizer in ("lars", "lamb"):
        return layerwise_optimizer(
            model,
            spec.optimizer,
            lr0,
            weight_decay=spec.weight_decay,
            decay_norm_and_bias=spec.weight_decay_norm,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
        )
    raise ValueError(f"optimizer: unknown optimizer {spec.optimizer!r}")
