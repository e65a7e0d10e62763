"""Seed 004's "one forward, many backward": ``backward_splits`` m updates per forward pass.

The seed (../shared/seeds/004, "一次正向，多次反向") proposes: forward a large batch once,
keep the per-sample losses unaveraged, then back-propagate them in m parts, each part's
*mean* loss followed by an update; it reports that this behaves like an m-times larger LR
and costs more time per iteration (``retain_graph``). This module makes it a run option
that can be repeated exactly:

1. One forward pass over the kn batch at the weights w (BN statistics, running averages
   and ``bn_local`` groups exactly as in a plain iteration).
2. The batch is cut into m equal chunks of c = kn/m consecutive samples (whole workers when
   n divides c). Chunk j's loss is the mean cross-entropy over its c samples,
   ``L_j = sum(CE over chunk j) / c``; its gradient ``g_j = dL_j/dw`` is taken from the
   one graph with ``torch.autograd.grad(..., retain_graph=True)``, all m of them before any
   update, so every ``g_j`` is at w (an update changes the weights in place, which the
   saved graph needs untouched).
3. The m optimizer steps are applied in order (momentum, weight decay, LARS/LAMB as in
   any step), each at the LR of its own iteration.

Normalisation: each ``g_j`` is the mean over its c samples, the gradient a plain batch of
c = kn/m would give (the seed: "每次取16个instance的loss求平均" -- average the loss of each
part, then back-propagate). Against plain training at kn, whose update is
``(1/kn) sum`` = the mean of the ``g_j``, the m updates together move about
``m * lr * mean(g_j)`` to first order: the "m-times larger LR" the seed observed is what
this normalisation implies, not a side effect. (Dividing each chunk by kn instead would
make the m steps of plain SGD sum exactly to one kn step: nothing to study.)

Counting: an iteration is an update. An epoch has ``iters_per_epoch * m`` of them
(``Layout.iters_per_epoch`` already counts updates), so the LR schedule (warmup and
milestones are in epochs), metric steps, the summary tracker, progress, checkpoints and
resume all count updates. Each update is logged as its own step: its chunk's loss and
error at w, the LR it used, the norm of its chunk gradient, and a ``step_time`` that
shares the forward pass and the m backward passes evenly among the m updates plus its own
optimizer step (the m step times sum to the forward's wall time).

Layer health (``health_every``, trainer/health.py) is measured per update: the dead
fractions from the group's one forward (for the first measured update of the group), the
weight and chunk-gradient norms and the update ratio of that update's step. The gradient
noise scale is off with m > 1 (trainer/loop.py ``_probes``): no plain kn gradient exists.

Cost: every chunk's backward runs through the whole kn graph (the gradient of chunk j's
loss is zero outside it but BN couples the samples of a group, and autograd does not
prune), so a forward with m updates costs one forward plus m full backward passes, and m
gradient copies are held at once (m x the parameters' memory). RunSpec refuses m > 1 with
``nproc > 1`` (DDP would all-reduce each chunk gradient) and with ``micro_batch`` below kn
(the graph would not cover the batch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import Batch
from trainer.loop import EpochTotals, IterationRecord, _grad_norm
from trainer.optim import set_lr

if TYPE_CHECKING:
    from trainer.loop import _Run

__all__ = ["ChunkGradients", "chunk_gradients", "train_epoch"]

Grads = tuple[torch.Tensor | None, ...]


class ChunkGradients(NamedTuple):
    """The m chunks of one forward pass: their gradients at the forward's weights, and
    their mean losses and misclassified counts (shape (m,), on the device)."""

    grads: list[Grads]
    losses: torch.Tensor
    wrong: torch.Tensor


def chunk_gradients(
    net: nn.Module,
    params: Sequence[nn.Parameter],
    batch: Batch,
    splits: int,
    autocast: Callable[[], AbstractContextManager[Any]],
) -> ChunkGradients:
    """One forward over ``batch``, then the gradient of each of ``splits`` equal chunks'
    mean cross-entropy with respect to ``params``, all at the current weights."""
    x, y = batch
    size = len(y) // splits
    with autocast():
        out = net(x)
    ce = F.cross_entropy(out.float(), y, reduction="none")
    losses = ce.view(splits, size).sum(1) / size
    grads: list[Grads] = []
    for j in range(splits):
        # The graph is kept until the last chunk has its gradient (retain_graph).
        grads.append(
            torch.autograd.grad(losses[j], params, retain_graph=j < splits - 1, allow_unused=True)
        )
    wrong = (out.detach().argmax(1) != y).view(splits, size).sum(1).float()
    return ChunkGradients(grads, losses.detach(), wrong)


def train_epoch(run: _Run, epoch: int) -> bool:
    """``_Run._train_epoch`` for backward_splits > 1: each kn batch makes m updates.
    True when a stop was requested (the loop's contract)."""
    layout, opt = run.layout, run.optimizer
    m, ipe, forwards = layout.backward_splits, layout.iters_per_epoch, layout.forwards_per_epoch
    run.totals = EpochTotals()
    t_prev = t_epoch = time.perf_counter()
    batches, stop = run.data.epoch(epoch), False
    probes = getattr(run, "probes", ())  # layer health (the noise probe is off with m > 1)
    for f in range(forwards):
        t0 = time.perf_counter()
        batch = next(batches)
        run.totals.data_time += time.perf_counter() - t0
        group = range(epoch * ipe + f * m, epoch * ipe + (f + 1) * m)
        for probe in probes:  # its forward hooks see the one forward of the group
            measured = [it for it in group if probe.measuring(it)]
            if measured:
                probe.begin(measured[0])
        chunks = chunk_gradients(run.net, run.params, batch, m, run._autocast)
        t_grads = time.perf_counter()
        shared = (t_grads - t_prev) / m  # data, forward and m backwards, split evenly
        t_prev = t_grads
        for j in range(m):
            it = epoch * ipe + f * m + j
            lr = run.schedule.lr(it)
            set_lr(opt, lr)
            grads = chunks.grads[j]
            chunks.grads[j] = ()  # free it once applied
            for p, g in zip(run.params, grads, strict=True):
                p.grad = g
            grad_norm = _grad_norm(run.params)  # of this chunk's gradient, just set
            for probe in probes:
                probe.before_step(it, batch.x, batch.y, grad_norm)
            opt.step()
            for probe in probes:
                probe.after_step(it)
            opt.zero_grad(set_to_none=True)
            t_end = time.perf_counter()
            record = IterationRecord(it, lr, shared + t_end - t_prev, t_end)
            run.buffer.add(record, chunks.losses[j], chunks.wrong[j], grad_norm)
            t_prev = t_end
            last = f == forwards - 1 and j == m - 1
            if last or run.buffer.full():
                stop = run._flush(force_poll=last)
                if stop and not last:
                    batches.close()
                    return True
    batches.close()
    run._end_epoch(epoch, time.perf_counter() - t_epoch)
    return stop
