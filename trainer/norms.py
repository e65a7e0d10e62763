"""Normalization layers for large-minibatch training, chosen by ``RunSpec.norm``.

The training loop forwards the samples of all k virtual workers (k chunks of n) in one
pass. Goyal et al. compute BN statistics per worker (over n samples), so ``bn_local`` is
batch norm whose statistics are taken per group of n consecutive samples
(:class:`GroupedBatchNorm` with ``group_size = n``); ``bn_ghost`` uses groups of
``ghost_batch``; ``bn_sync`` normalizes over the whole forward batch and, with a process
group of several ranks, over all ranks' batches. The loop may override the group size of
every layer at once with :func:`set_group_size`.

Other norms: :class:`FilterResponseNorm` (+TLU, Singh & Krishnan 2019, batch-independent),
:class:`CrossIterationBatchNorm` (Yao et al. 2020, statistics of the last iterations
compensated by a first-order Taylor step in the preceding layer's weight), ``nn.GroupNorm``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

if TYPE_CHECKING:
    from trainer.spec import RunSpec

__all__ = [
    "NORM_LAYER_TYPES",
    "CrossIterationBatchNorm",
    "FilterResponseNorm",
    "GroupedBatchNorm",
    "RunningStatsAverage",
    "attach_cbn",
    "make_norm",
    "make_norm_act",
    "norm_group_size",
    "set_group_size",
]


def _check_dims(dims: int, x: torch.Tensor, name: str) -> None:
    # dims 0/1 accept (B, C) and (B, C, L); dims 2 wants (B, C, H, W).
    ok = x.dim() in (2, 3) if dims in (0, 1) else x.dim() == dims + 2
    if not ok:
        raise ValueError(f"{name}(dims={dims}) got an input of shape {tuple(x.shape)}")


def _dist_world() -> int:
    """World size of the default process group, 1 when there is none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _eval_batch_norm(bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Evaluation: normalise with the running statistics, as nn.BatchNorm does."""
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class GroupedBatchNorm(_BatchNorm):
    """Batch norm with statistics per group of ``group_size`` consecutive samples.

    ``group_size=None`` normalizes over the whole batch (then it is ``nn.BatchNorm``, and
    with ``sync=True`` and an initialized process group of several ranks, batch norm over
    all ranks' samples). The groups are computed in one vectorised call (the batch is
    viewed as (B/g, g, C, ...)), never a Python loop. Running statistics follow PyTorch
    (``momentum`` weights the new value, the variance is unbiased) and are updated with
    the mean over groups of each group's statistics; eval mode uses them.

    Subclassing ``_BatchNorm`` keeps the parameter and buffer names of ``nn.BatchNorm``,
    so state dicts are interchangeable and code that looks for batch norms finds it.
    """

    def __init__(
        self,
        num_features: int,
        dims: int = 2,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        *,
        group_size: int | None = None,
        sync: bool = False,
        affine: bool = True,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        if dims not in (0, 1, 2):
            raise ValueError(f"dims must be 0, 1 or 2, got {dims}")
        self.dims = dims
        self.group_size = group_size
        self.sync = sync

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_dims(self.dims, input, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}, sync={self.sync}"

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return _eval_batch_norm(self, x)
        self.num_batches_tracked.add_(1)
        momentum = self._momentum()
        g = self.group_size
        if g is None or g == x.shape[0]:
            if self.sync and _dist_world() > 1:
                return self._sync_forward(x, momentum)
            # Whole batch: PyTorch's own kernel, bit-compatible with nn.BatchNorm.
            stats = (self.running_mean, self.running_var)
            return F.batch_norm(x, *stats, self.weight, self.bias, True, momentum, self.eps)
        return self._grouped_forward(x, g, momentum)

    def _momentum(self) -> float:
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm does
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _grouped_forward(self, x: torch.Tensor, g: int, momentum: float) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        if b % g:
            raise ValueError(
                f"{type(self).__name__}: a batch of {b} samples is not a whole number of "
                f"BN groups of {g}; call trainer.norms.set_group_size(model, g) with a g "
                "that divides the forward batch"
            )
        groups = b // g
        spatial = x.shape[2:]
        # (G*g, C, *S) -> (g, G*C, *S): each (group, channel) pair becomes one channel of a
        # plain batch norm, so the fused native kernel (forward and backward) does the work.
        xg = x.reshape(groups, g, c, *spatial).transpose(0, 1).reshape(g, groups * c, *spatial)
        # Scratch running buffers with momentum 1 receive each group's (mean, unbiased var),
        # in float32 for reduced-precision inputs and in float64 for float64 ones.
        dtype = torch.promote_types(x.dtype, torch.float32)
        mean = torch.zeros(groups * c, device=x.device, dtype=dtype)
        var = torch.ones(groups * c, device=x.device, dtype=dtype)
        yg = F.batch_norm(xg, mean, var, None, None, True, 1.0, self.eps)
        with torch.no_grad():
            self.running_mean.lerp_(mean.view(groups, c).mean(0).to(self.running_mean), momentum)
            self.running_var.lerp_(var.view(groups, c).mean(0).to(self.running_var), momentum)
        y = yg.reshape(g, groups, c, *spatial).transpose(0, 1).reshape(x.shape)
        if self.affine:
            shape = (1, c) + (1,) * len(spatial)
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def _sync_forward(self, x: torch.Tensor, momentum: float) -> torch.Tensor:
        # Statistics over every rank's batch (torch.nn.SyncBatchNorm refuses CPU and gloo).
        # Each rank writes its (count, mean, variance) into its own row of a zero matrix;
        # a differentiable sum all-reduce of it is an all-gather, so each rank's input
        # gradient includes the other ranks' losses through the shared statistics. Rows
        # are combined with the exact parallel-variance formula, which keeps float32
        # precise where sum(x^2) - sum(x)^2 / n would cancel.
        import torch.distributed as dist

        c, world, rank = x.shape[1], dist.get_world_size(), dist.get_rank()
        reduce_dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = x.numel() // c
        local = torch.cat(
            [
                torch.full((1,), float(count), device=x.device),
                xf.mean(reduce_dims),
                xf.var(reduce_dims, unbiased=False),
            ]
        )
        rows = torch.zeros(world, 2 * c + 1, device=x.device, dtype=torch.float32)
        rows = _AllReduceSum.apply(
            rows.index_copy(0, torch.tensor([rank], device=x.device), local[None])
        )
        counts, means, variances = rows[:, :1], rows[:, 1 : 1 + c], rows[:, 1 + c :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var = (counts * (variances + (means - mean) ** 2)).sum(0) / n
        with torch.no_grad():
            unbiased = var * n / (n - 1).clamp_min(1)
            self.running_mean.lerp_(mean.detach().to(self.running_mean), momentum)
            self.running_var.lerp_(unbiased.detach().to(self.running_var), momentum)
        shape = (1, c) + (1,) * (x.dim() - 2)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        y = y.to(x.dtype)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over the default process group.

    Every rank's loss depends on the summed tensor, so the gradient of a rank's input is
    the sum over ranks of their gradients: backward all-reduces too.
    (torch.distributed.nn.functional.all_reduce does the same but is deprecated.)
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = grad.clone()
        dist.all_reduce(out)
        return out


class FilterResponseNorm(nn.Module):
    """Filter Response Normalization with an optional TLU (Singh & Krishnan 2019).

    ``y = gamma * x / sqrt(nu2 + eps) + beta`` with ``nu2`` the mean of ``x**2`` over the
    spatial dimensions of each sample and channel, then ``max(y, tau)`` when ``tlu``.
    Nothing is averaged over the batch, so a sample's output never depends on the others.
    For (B, C) inputs there are no spatial dimensions: ``nu2 = x**2`` and the layer is
    close to ``sign(x)``; the paper makes ``eps`` learnable in that case
    (``learnable_eps=True``: ``eps + |eps_l|``), which :func:`make_norm` does for dims=0.
    """

    def __init__(
        self,
        num_features: int,
        dims: int = 2,
        eps: float = 1e-6,
        *,
        tlu: bool = True,
        learnable_eps: bool = False,
    ) -> None:
        super().__init__()
        if dims not in (0, 1, 2):
            raise ValueError(f"dims must be 0, 1 or 2, got {dims}")
        self.num_features, self.dims, self.eps, self.tlu = num_features, dims, eps, tlu
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.tau = nn.Parameter(torch.zeros(num_features)) if tlu else None
        # The paper initialises the learned epsilon to 1e-4 (its absolute value is used).
        self.eps_l = nn.Parameter(torch.full((num_features,), 1e-4)) if learnable_eps else None

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, dims={self.dims}, eps={self.eps}, tlu={self.tlu}, "
            f"learnable_eps={self.eps_l is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_dims(self.dims, x, type(self).__name__)
        shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
        nu2 = x.pow(2).mean(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else x * x
        eps = self.eps if self.eps_l is None else self.eps + self.eps_l.abs().view(shape)
        y = x * torch.rsqrt(nu2 + eps)
        y = self.weight.view(shape) * y + self.bias.view(shape)
        if self.tau is not None:
            y = torch.maximum(y, self.tau.view(shape))
        return y


# --- factories ------------------------------------------------------------------------------
def norm_group_size(spec: RunSpec, chunk: int | None = None) -> int | None:
    """BN statistics group size for forwards of ``chunk`` samples (default: n), None for
    the whole forward batch.

    bn_local is the paper's per-worker BN: the k virtual workers' samples arrive as k
    consecutive chunks of n in one forward pass, so groups are n (or a smaller chunk).
    cbn keeps per-worker statistics too; bn_ghost uses ghost_batch (its gcd with a chunk
    it does not divide).
    """
    n = spec.batch_per_worker
    chunk = chunk or n
    if spec.norm in ("bn_local", "cbn"):
        return min(n, chunk)
    if spec.norm == "bn_ghost":
        g = spec.ghost_batch or n
        return g if chunk % g == 0 else math.gcd(g, chunk)
    return None


def _gn_groups(wanted: int, channels: int) -> int:
    """The largest group count <= wanted that divides channels (GroupNorm needs it)."""
    for groups in range(min(wanted, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def make_norm(spec: RunSpec, num_features: int, dims: int) -> nn.Module:
    """The normalization layer of ``spec.norm`` alone (no activation).

    Used where no activation follows, e.g. the last norm of a residual block. dims: 0 for
    (B, C) inputs of fully connected layers, 1 for (B, C, L), 2 for (B, C, H, W).
    """
    norm = spec.norm
    if norm in ("bn_local", "bn_ghost", "bn_sync"):
        return GroupedBatchNorm(
            num_features,
            dims,
            spec.bn_momentum,
            group_size=norm_group_size(spec),
            sync=norm == "bn_sync",
        )
    if norm == "cbn":
        return CrossIterationBatchNorm(
            num_features,
            dims,
            spec.bn_momentum,
            window=spec.cbn_window,
            group_size=norm_group_size(spec),
        )
    if norm == "frn":
        return FilterResponseNorm(num_features, dims, tlu=False, learnable_eps=dims == 0)
    if norm == "gn":
        return nn.GroupNorm(_gn_groups(spec.gn_groups, num_features), num_features)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm: unknown normalization {norm!r}")


def make_norm_act(spec: RunSpec, num_features: int, dims: int) -> nn.Module:
    """Normalization followed by its activation: ReLU, or TLU for frn (which replaces it)."""
    if spec.norm == "frn":
        return FilterResponseNorm(num_features, dims, tlu=True, learnable_eps=dims == 0)
    if spec.norm == "none":
        return nn.ReLU(inplace=True)
    return nn.Sequential(make_norm(spec, num_features, dims), nn.ReLU(inplace=True))


def set_group_size(model: nn.Module, group_size: int | None) -> None:
    """Set the statistics group size of every grouped batch norm in ``model``.

    The loop calls it before forwards whose chunking differs from the spec's default
    (e.g. micro-batches smaller than n). None: the whole forward batch.
    """
    if group_size is not None and group_size < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size}")
    for m in model.modules():
        if isinstance(m, GroupedBatchNorm | CrossIterationBatchNorm):
            m.group_size = group_size


def attach_cbn(model: nn.Module) -> None:
    """Give each CrossIterationBatchNorm the conv/linear layer that feeds it.

    Walks the modules in registration order (which the models keep equal to forward
    order) and attaches each cbn to the last Conv/Linear seen before it. Checks that the
    layer's output channels match, so a wrong wiring fails loudly.
    """
    last: nn.Module | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Linear):
            last = m
        elif isinstance(m, CrossIterationBatchNorm):
            if last is None:
                raise ValueError(f"cbn layer {name!r} has no preceding conv/linear layer")
            m.attach(last)


class CrossIterationBatchNorm(_BatchNorm):
    """Cross-Iteration Batch Normalization (Yao et al. 2020, arXiv 2002.05712).

    Batch statistics are averaged over the current and the ``window - 1`` previous
    iterations. An old iteration's statistics were computed with old weights; each is
    moved to the current weights of the preceding conv/linear layer by a first-order
    Taylor step, ``mu(t-tau) + dmu/dW(t-tau) . (W(t) - W(t-tau))`` (same for the mean of
    squares), as the paper and its official code (Howal/Cross-iterationBatchNorm) do:
    only the immediately preceding layer's weight is compensated, the derivatives are
    taken with one ``autograd.grad`` of the summed statistics (channel c's statistic
    depends only on row c of that weight), and no gradient flows into old statistics. An
    old entry whose compensated variance comes out negative is dropped from the average.

    Statistics are kept per group of ``group_size`` samples (one virtual worker's chunk,
    as :class:`GroupedBatchNorm`), each group compensated with its own derivatives, which
    costs ``2 * groups`` copies of the weight per remembered iteration. Until ``window - 1``
    iterations are remembered, and in eval mode, the layer is plain (grouped) BN. Running
    statistics come from the current batch only. Models wire the preceding layer with
    :meth:`attach` (``trainer.norms.attach_cbn``); unattached, or with that weight frozen,
    the old statistics are averaged without compensation.
    """

    def __init__(
        self,
        num_features: int,
        dims: int = 2,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        *,
        window: int = 4,
        group_size: int | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True)
        if dims not in (0, 1, 2):
            raise ValueError(f"dims must be 0, 1 or 2, got {dims}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.dims, self.window, self.group_size = dims, window, group_size
        # History, newest first: (mu, meanx2, dmu/dW, dmeanx2/dW, W), stats of shape (G, C).
        self._history: list[tuple[torch.Tensor, ...]] = []
        self._prev: nn.Module | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        _check_dims(self.dims, input, type(self).__name__)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, group_size={self.group_size}"

    def attach(self, layer: nn.Module | None) -> None:
        """Use ``layer.weight`` (the conv/linear feeding this norm) for the compensation."""
        if layer is not None:
            weight = getattr(layer, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.shape[0] != self.num_features:
                raise ValueError(
                    f"cbn with {self.num_features} channels cannot attach to {layer!r}: its "
                    "weight must have one row per channel"
                )
        # Not a submodule (that would duplicate it in state dicts): a plain attribute.
        object.__setattr__(self, "_prev", layer)
        self._history = []

    # The history is part of the training state: checkpoints carry it, so a resumed
    # run normalizes exactly as the uninterrupted one would.
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "history": [tuple(None if t is None else t.clone() for t in h) for h in self._history]
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._history = [tuple(h) for h in state.get("history", [])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return _eval_batch_norm(self, x)
        self.num_batches_tracked.add_(1)
        b, c, spatial = x.shape[0], x.shape[1], x.shape[2:]
        g = self.group_size or b
        if b % g:
            raise ValueError(
                f"{type(self).__name__}: a batch of {b} samples is not a whole number of "
                f"BN groups of {g}; call trainer.norms.set_group_size(model, g)"
            )
        groups = b // g
        xg = x.reshape(groups, g, c, -1).float()
        mu = xg.mean(dim=(1, 3))  # (G, C)
        meanx2 = xg.pow(2).mean(dim=(1, 3))
        self._update_running(mu, meanx2, g * xg.shape[3])

        weight = self._prev_weight()
        if self.window > 1 and self._history and self._history[0][0].shape != mu.shape:
            self._history = []  # the batch was regrouped: old statistics do not match
        jac = self._jacobians(mu, meanx2, weight) if self.window > 1 else None
        if self.window > 1 and len(self._history) >= self.window - 1:
            mean, var = self._window_stats(mu, meanx2, weight)
        else:
            mean, var = mu, (meanx2 - mu * mu).clamp_min(0.0)
        if self.window > 1:
            w_now = weight.detach().clone() if weight is not None else None
            entry = (mu.detach(), meanx2.detach(), *(jac or (None, None)), w_now)
            self._history = [entry, *self._history][: self.window - 1]

        y = (xg - mean[:, None, :, None]) * torch.rsqrt(var[:, None, :, None] + self.eps)
        y = y.reshape(x.shape).to(x.dtype)
        shape = (1, c) + (1,) * len(spatial)
        return y * self.weight.view(shape) + self.bias.view(shape)

    def _prev_weight(self) -> torch.Tensor | None:
        return None if self._prev is None else self._prev.weight

    def _update_running(self, mu: torch.Tensor, meanx2: torch.Tensor, count: int) -> None:
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        with torch.no_grad():
            var = (meanx2 - mu * mu).clamp_min(0.0) * (count / max(count - 1, 1))
            self.running_mean.lerp_(mu.mean(0).to(self.running_mean), momentum)
            self.running_var.lerp_(var.mean(0).to(self.running_var), momentum)

    def _jacobians(
        self, mu: torch.Tensor, meanx2: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """d mu[g, c] / d W[c] and d meanx2[g, c] / d W[c], each (G, *W.shape)."""
        if weight is None or not weight.requires_grad or not mu.requires_grad:
            return None  # frozen or unattached: W cannot change, no compensation needed
        groups = mu.shape[0]
        stats = torch.stack([mu, meanx2])  # (2, G, C)
        # One-hot cotangents select one (statistic, group) at a time; summing over the
        # channels is exact because channel c depends on W[c] only.
        eye = torch.eye(2 * groups, device=mu.device, dtype=mu.dtype)
        cotangents = eye.view(2 * groups, 2, groups, 1).expand(-1, -1, -1, mu.shape[1])
        if groups == 1:
            grads = torch.stack(
                [
                    torch.autograd.grad(stats, weight, cotangents[i], retain_graph=True)[0]
                    for i in range(2)
                ]
            )
        else:
            (grads,) = torch.autograd.grad(
                stats, weight, cotangents, retain_graph=True, is_grads_batched=True
            )
        grads = grads.detach().view(2, groups, *weight.shape)
        return grads[0], grads[1]

    def _compensated_history(
        self, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The remembered (mu, meanx2), each (K, G, C), moved to the current weight."""
        mus, mx2s = [], []
        for mu_old, mx2_old, dmu, dmx2, w_old in self._history[: self.window - 1]:
            if dmu is not None and weight is not None and w_old is not None:
                delta = (weight.detach() - w_old).unsqueeze(0)  # (1, *W)
                reduce = tuple(range(2, delta.dim()))
                mu_old = mu_old + (dmu * delta).sum(reduce).to(mu_old)
                mx2_old = mx2_old + (dmx2 * delta).sum(reduce).to(mx2_old)
            mus.append(mu_old)
            mx2s.append(mx2_old)
        return torch.stack(mus), torch.stack(mx2s)

    def _window_stats(
        self, mu: torch.Tensor, meanx2: torch.Tensor, weight: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_mu, old_mx2 = self._compensated_history(weight)
        valid = (old_mx2 - old_mu * old_mu >= 0).to(mu.dtype)  # drop negative variances
        count = 1.0 + valid.sum(0)
        mean = (mu + (valid * old_mu).sum(0)) / count
        mx2 = (meanx2 + (valid * old_mx2).sum(0)) / count
        return mean, (mx2 - mean * mean).clamp_min(0.0)


class RunningStatsAverage:
    """Running BN statistics of an iteration forwarded in chunks, set as one pass sets them.

    Every chunk's forward starts from the statistics before the iteration; ``end`` keeps
    the chunks' results averaged by chunk size. The running update is linear in the batch
    statistics, so that is the momentum step toward the mean of the chunks' statistics:
    what one pass of grouped BN computes from the mean of its groups' statistics.
    """

    def __init__(self, model: nn.Module) -> None:
        norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.stats = [b for m in norms for b in (m.running_mean, m.running_var)]
        self.counts = [m.num_batches_tracked for m in norms]
        self.before: list[torch.Tensor] = []
        self.total: list[torch.Tensor] = []

    def begin(self) -> None:
        self.before = [t.clone() for t in self.stats + self.counts]
        self.total = []

    def chunk_done(self, weight: float) -> None:
        """After a chunk's forward: add its statistics, weighted, then restore the start."""
        if self.total:
            torch._foreach_add_(self.total, self.stats, alpha=weight)
        else:
            self.total = torch._foreach_mul(self.stats, weight)
        torch._foreach_copy_(self.stats + self.counts, self.before)

    def end(self) -> None:
        torch._foreach_copy_(self.stats, self.total)
        torch._foreach_add_(self.counts, 1)


NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    FilterResponseNorm,
    CrossIterationBatchNorm,
)
