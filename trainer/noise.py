"""The gradient noise scale of McCandlish et al. 2018, measured live during training.

The simple noise scale is B_simple = tr(Sigma) / |G|^2: Sigma the per-sample gradient
covariance, G the true gradient. A minibatch gradient of B samples has
E|G_B|^2 = |G|^2 + tr(Sigma)/B, so two minibatch sizes B_small < B_big give unbiased
estimates of both (the paper's Appendix A):

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

One pair is very noisy (either estimate can be negative), so each is smoothed with an
exponential moving average before the ratio is taken, as the paper does. The EMA weighs
the newest measurement by 1 - ``EMA_BETA`` and is bias-corrected (divided by
1 - beta^t, as Adam does), so the first measurements are not pulled toward zero.

In the loop (:class:`NoiseProbe`), every ``spec.noise_every`` iterations:

- G_big is the iteration's gradient, the gradient of sum(CE)/kn over all kn samples (after
  DDP's all-reduce); its squared norm is the square of the ``grad_norm`` the loop already
  computes.
- G_small is an honest gradient of fewer samples at the same weights, with the same
  normalization semantics a run at that batch would have:

  * an iteration accumulated over several micro-batch chunks: the gradient after the
    first chunk (whole BN groups, see trainer/batches.py), times kn / chunk, read by a
    post-accumulate-grad hook on each parameter: free;
  * otherwise one extra forward + backward over the process's first worker (n samples;
    its BN groups are exactly the ones it had in the iteration's forward);
  * one worker in one process (k = 1): the iteration's own gradient is the small batch
    (n), and one extra forward + backward over the previous iteration's batch at the same
    weights gives the big one, the mean of both (2n). Both sides are whole BN groups: a
    cut sub-batch (the first design, n // 4) is
    normalised over fewer samples, which made |G_small|^2 too large and the |G|^2
    estimate negative on MNIST-1D runs at kn = 32.

  Extra passes take the gradient with ``torch.autograd.grad`` (``.grad`` is not touched)
  and every buffer (BN running statistics, cbn's history) is restored after, so the run
  trains exactly as with ``noise_every = 0``.

  Under DDP every process measures its own first worker (or first chunk) and rank 0's
  figures are logged: the extra pass recomputes a local gradient because DDP's reducer
  writes only the all-reduced one into ``.grad`` and offers no cheap hook on the local
  one. With ``bn_sync`` the extra pass's BN statistics are then those of every process's
  small batch together.

The host side (:meth:`NoiseProbe.take`, at the loop's metric flush) turns the squared norms
into the estimates, updates the EMA and returns ``noise_trace``, ``noise_g2`` and, when
both are positive, ``noise_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "EMA_BETA",
    "NoiseProbe",
    "NoiseScaleEMA",
    "g2_estimate",
    "small_batch_size",
    "trace_estimate",
]

# Per measurement: the EMA spans about 10 measurements (200 iterations at the default
# noise_every = 20). One pair's estimates have a relative spread of order 1, so fewer
# measurements leave the ratio too noisy to read; many more would lag a changing scale.
EMA_BETA = 0.9


def g2_estimate(b_small: float, g2_small: float, b_big: float, g2_big: float) -> float:
    """Unbiased estimate of |G|^2 from squared gradient norms at two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"b_small: need 0 < b_small < b_big, got {b_small} and {b_big}")
    return (b_big * g2_big - b_small * g2_small) / (b_big - b_small)


def trace_estimate(b_small: float, g2_small: float, b_big: float, g2_big: float) -> float:
    """Unbiased estimate of tr(Sigma), the per-sample gradient variance summed."""
    if not 0 < b_small < b_big:
        raise ValueError(f"b_small: need 0 < b_small < b_big, got {b_small} and {b_big}")
    return (g2_small - g2_big) / (1.0 / b_small - 1.0 / b_big)


@dataclass
class NoiseScaleEMA:
    """Bias-corrected EMAs of the two estimates, and their ratio B_simple."""

    beta: float = EMA_BETA
    count: int = 0
    trace_acc: float = 0.0  # uncorrected EMA accumulators
    g2_acc: float = 0.0

    def update(self, b_small: float, g2_small: float, b_big: float, g2_big: float) -> bool:
        """Add one measurement; False (and nothing changes) when it is not finite."""
        trace = trace_estimate(b_small, g2_small, b_big, g2_big)
        g2 = g2_estimate(b_small, g2_small, b_big, g2_big)
        if not (math.isfinite(trace) and math.isfinite(g2)):
            return False
        self.count += 1
        self.trace_acc = self.beta * self.trace_acc + (1 - self.beta) * trace
        self.g2_acc = self.beta * self.g2_acc + (1 - self.beta) * g2
        return True

    def _corrected(self, acc: float) -> float:
        return acc / (1.0 - self.beta**self.count)

    @property
    def trace(self) -> float | None:
        return self._corrected(self.trace_acc) if self.count else None

    @property
    def g2(self) -> float | None:
        return self._corrected(self.g2_acc) if self.count else None

    @property
    def noise_scale(self) -> float | None:
        """B_simple, or None while either EMA is not positive (the ratio means nothing)."""
        trace, g2 = self.trace, self.g2
        if trace is None or g2 is None or trace <= 0 or g2 <= 0:
            return None
        return trace / g2

    def metrics(self) -> dict[str, float]:
        """The metric points of the current state (none before the first measurement)."""
        if not self.count:
            return {}
        out = {"noise_trace": float(self.trace), "noise_g2": float(self.g2)}  # type: ignore[arg-type]
        scale = self.noise_scale
        if scale is not None and math.isfinite(scale):
            out["noise_scale"] = scale
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "count": self.count,
            "trace_acc": self.trace_acc,
            "g2_acc": self.g2_acc,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
        self.count = int(state["count"])
        self.trace_acc = float(state["trace_acc"])
        self.g2_acc = float(state["g2_acc"])


def small_batch_size(workers: int, n: int) -> int | None:
    """Samples of the extra pass's small batch: one worker's n (k > 1), or n // 4 (at
    least 2) of the single worker; None when no batch smaller than kn fits."""
    if workers > 1:
        return n
    size = max(2, n // 4)
    return size if size < n else None


def _sq_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of all ``tensors``, in fp32, on their device (no sync)."""
    norms = torch._foreach_norm(tensors)
    return torch.stack(norms).float().square().sum()


@dataclass
class _Pending:
    it: int
    b_small: int
    g2_small: torch.Tensor  # of the rescaled small-batch gradient, on the device
    b_big: int
    g2_big: torch.Tensor


@dataclass
class NoiseProbe:
    """The loop's side: measures every ``every`` iterations, keeps the EMA.

    ``begin(it)`` before the iteration's forward, ``before_step(it, batch, grad_norm)``
    after its backward (weights unchanged), ``after_step(it)`` after the optimizer step,
    ``take()`` at a metric flush (the host side, after the flush's sync).
    """

    model: nn.Module
    params: list[nn.Parameter]
    every: int
    total_batch: int  # B_big: kn
    first_chunk: int  # samples of the first micro-batch chunk (= process batch: no chunks)
    chunked: bool
    small: int | None  # the extra pass's batch size (None: no smaller batch exists)
    regroup: Callable[[int | None], None]  # sets BN group sizes for a forward of N samples
    autocast: Callable[[], AbstractContextManager[Any]]
    # One worker in one process: the iteration's batch is the small one, paired with the
    # previous batch's gradient at the same weights (B_big = 2n, BN groups unchanged).
    pair_previous: bool = False
    ema: NoiseScaleEMA = field(default_factory=NoiseScaleEMA)
    pending: list[_Pending] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)
    _chunk_sq: list[torch.Tensor] = field(default_factory=list)
    _previous: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        # Found once: walking the modules costs about as much as a small model's forward.
        self._buffers = list(self.model.buffers())
        self._with_history = [m for m in self.model.modules() if hasattr(m, "_history")]

    def measuring(self, it: int) -> bool:
        return self.every > 0 and (it + 1) % self.every == 0

    def begin(self, it: int) -> None:
        """On a chunked measuring iteration, capture each gradient after the first chunk."""
        if not (self.chunked and self.measuring(it)):
            return
        self._chunk_sq = []
        seen: set[int] = set()

        def hook(p: torch.Tensor) -> None:
            # The first accumulation of the iteration (zero_grad set .grad to None): the
            # first chunk's gradient alone.
            if id(p) not in seen and p.grad is not None:
                seen.add(id(p))
                self._chunk_sq.append(p.grad.detach().float().square().sum())

        self._hooks = [p.register_post_accumulate_grad_hook(hook) for p in self.params]

    def before_step(
        self, it: int, x: torch.Tensor, y: torch.Tensor, grad_norm: torch.Tensor
    ) -> None:
        previous = self._previous
        if self.pair_previous:
            # Kept (a copy: a batch buffer may be reused) for the next iteration only.
            keep = self.measuring(it + 1)
            self._previous = (x.detach().clone(), y.detach().clone()) if keep else None
        if not self.measuring(it):
            return
        kn, b_big, g2_big = self.total_batch, self.total_batch, grad_norm.detach().float().square()
        if self.pair_previous:
            if previous is None:  # the first iteration after a start or a resume
                return
            b_small, g2_small = kn, g2_big
            b_big, g2_big = 2 * kn, self._paired_sq_norm(*previous)
        elif self.chunked:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            if not self._chunk_sq:
                return
            b_small = self.first_chunk
            # The chunk's loss is sum(CE)/kn: its gradient times kn/b is the chunk's mean.
            g2_small = torch.stack(self._chunk_sq).sum() * (kn / b_small) ** 2
            self._chunk_sq = []
        else:
            if self.small is None:
                return
            b_small = self.small
            g2_small = self._extra_pass(x[:b_small], y[:b_small])
        self.pending.append(_Pending(it, b_small, g2_small, b_big, g2_big))

    def after_step(self, it: int) -> None:
        """Nothing: the noise scale needs the weights before the step only."""

    def _extra_pass(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """|grad|^2 of the mean CE over (x, y) at the current weights."""
        return _sq_norm([g for g in self._gradient(x, y) if g is not None])

    def _paired_sq_norm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """|(G + G')/2|^2: G this iteration's mean gradient (``.grad``), G' the mean gradient
        of (x, y), as many samples, at the same weights: the gradient of both batches."""
        pairs = [
            (p.grad.detach(), g)
            for p, g in zip(self.params, self._gradient(x, y), strict=True)
            if p.grad is not None and g is not None
        ]
        both = torch._foreach_add([a for a, _ in pairs], [b for _, b in pairs])
        return _sq_norm(both) / 4

    def _gradient(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """The mean-CE gradient over (x, y) at the current weights; the model's buffers and
        ``.grad`` are as they were before."""
        with _restored(self._buffers, self._with_history):
            self.regroup(x.shape[0])
            try:
                with self.autocast():
                    out = self.model(x)
                loss = F.cross_entropy(out.float(), y, reduction="mean")
                return torch.autograd.grad(loss, self.params, allow_unused=True)
            finally:
                self.regroup(None)

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """Host side: fold pending measurements into the EMA; the points to log."""
        out: list[tuple[int, dict[str, float]]] = []
        for p in self.pending:
            if self.ema.update(p.b_small, p.g2_small.item(), p.b_big, p.g2_big.item()):
                values = self.ema.metrics()
                if values:
                    out.append((p.it, values))
        self.pending = []
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema.load_state_dict(state)


@contextmanager
def _restored(buffers: list[torch.Tensor], with_history: list[nn.Module]) -> Iterator[None]:
    """Run a forward that must leave no trace: buffers (BN running statistics and counts)
    and cbn's statistics history are put back afterwards."""
    saved = [b.clone() for b in buffers]
    histories = [(m, list(m._history)) for m in with_history]
    try:
        yield
    finally:
        if buffers:
            torch._foreach_copy_(buffers, saved)
        for m, history in histories:
            m._history = history
