"""Per-layer health: why a large-batch run failed (dead ReLUs, norms, update ratios).

Every ``spec.health_every`` iterations, for each conv/linear layer (its name in
``model.named_modules()``), :class:`HealthProbe` measures:

- ``health/<layer>/dead``: the fraction of the layer's output units (channels of a conv,
  features of a linear) that the ReLU after it sets to zero for every sample of the
  iteration's batch (all micro-batch chunks; under DDP this process's share). Absent for a
  layer no ReLU follows (the classifier; frn's TLU is not a ReLU).
- ``health/<layer>/w_norm``: ||W|| of the layer's weight (bias excluded) before the step.
- ``health/<layer>/g_norm``: ||dL/dW||, the loss gradient of the iteration (of
  sum(CE)/kn, after DDP's all-reduce; weight decay is not in it).
- ``health/<layer>/update_ratio``: ||W_after - W_before|| / ||W_before|| of the step (the
  quantity LARS controls; weight decay and momentum are in it).

Which ReLU belongs to which layer is read from the order of calls in the forward pass:
a ReLU call is charged to the first conv/linear called since the previous ReLU call. That
is the layer itself in conv -> norm -> ReLU, conv2 in a residual block's
conv2 -> norm -> (+ shortcut) -> ReLU (the shortcut's own conv, torchvision's
``downsample.0``, runs after conv3 and gets no ReLU), and works for a ReLU module called
several times (torchvision's Bottleneck).

Hooks exist only during a measuring iteration's forward (installed by ``begin``, removed
by ``before_step``); weights are copied only then. With ``compile`` no forward hooks are
installed (a compiled graph would recompile for them): the dead fractions are left out.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["HealthProbe", "LAYER_TYPES", "health_layers"]

LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.Linear)
_KEY_RE = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")  # the store's metric-key rule
_STATS = ("dead", "w_norm", "g_norm", "update_ratio")


def health_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The conv/linear layers of ``model`` whose metric keys fit the store's rule."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, LAYER_TYPES) and all(_KEY_RE.match(f"health/{name}/{s}") for s in _STATS)
    ]


@dataclass
class _Pending:
    it: int
    keys: list[str]
    values: torch.Tensor  # one per key, on the device


@dataclass
class HealthProbe:
    """The loop's side: ``begin(it)`` before the forward, ``before_step(...)`` after the
    backward, ``after_step(it)`` after the optimizer step, ``take()`` at a metric flush."""

    model: nn.Module
    every: int
    dead: bool = True  # install ReLU hooks (False under torch.compile)
    pending: list[_Pending] = field(default_factory=list)
    _hooks: list[Any] = field(default_factory=list)
    _open: str | None = None  # the first layer called since the last ReLU
    _live: dict[str, torch.Tensor] = field(default_factory=dict)  # per-unit max of ReLU out
    _before: list[torch.Tensor] = field(default_factory=list)
    _stats: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = health_layers(self.model)
        self.weights = [m.weight for _, m in self.layers]

    def measuring(self, it: int) -> bool:
        return self.every > 0 and (it + 1) % self.every == 0

    def begin(self, it: int) -> None:
        if not (self.dead and self.measuring(it)):
            return
        self._open, self._live = None, {}
        # Each forward (micro-batch chunk) starts with no layer open: the classifier of
        # the previous chunk has no ReLU and must not take the next chunk's first one.
        self._hooks.append(self.model.register_forward_pre_hook(self._forward_starts))
        for name, m in self.layers:
            self._hooks.append(m.register_forward_hook(self._layer_hook(name)))
        for m in self.model.modules():
            if isinstance(m, nn.ReLU):
                self._hooks.append(m.register_forward_hook(self._relu_hook))

    def _forward_starts(self, module: nn.Module, args: Any) -> None:
        self._open = None

    def _layer_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if self._open is None:
                self._open = name

        return hook

    def _relu_hook(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        name, self._open = self._open, None
        if name is None:
            return
        # ReLU outputs are >= 0: a unit is dead when its max over samples and positions is 0.
        dims = [d for d in range(out.dim()) if d != 1]
        peak = out.detach().amax(dim=dims).float()
        prev = self._live.get(name)
        self._live[name] = peak if prev is None else torch.maximum(prev, peak)

    def before_step(
        self, it: int, x: torch.Tensor, y: torch.Tensor, grad_norm: torch.Tensor
    ) -> None:
        if not self.measuring(it):
            return
        for h in self._hooks:
            h.remove()
        self._hooks = []
        grads = [w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights]
        self._before = [w.detach().clone() for w in self.weights]
        self._stats = {
            "w_norm": torch.stack(torch._foreach_norm(self._before)).float(),
            "g_norm": torch.stack(torch._foreach_norm(grads)).float(),
        }

    def after_step(self, it: int) -> None:
        if not self.measuring(it) or not self._before:
            return
        delta = torch._foreach_sub([w.detach() for w in self.weights], self._before)
        w_norm = self._stats["w_norm"]
        ratio = torch.stack(torch._foreach_norm(delta)).float() / w_norm
        keys: list[str] = []
        rows: list[torch.Tensor] = []
        for i, (name, _) in enumerate(self.layers):
            live = self._live.get(name)
            if live is not None:
                keys.append(f"health/{name}/dead")
                rows.append((live <= 0).float().mean())
            keys += [f"health/{name}/{s}" for s in ("w_norm", "g_norm", "update_ratio")]
            rows += [w_norm[i], self._stats["g_norm"][i], ratio[i]]
        self.pending.append(_Pending(it, keys, torch.stack(rows)))
        self._before, self._stats, self._live = [], {}, {}

    def take(self) -> list[tuple[int, dict[str, float]]]:
        """Host side (after the flush's sync): the points to log, finite values only."""
        out = []
        for p in self.pending:
            values = dict(zip(p.keys, p.values.tolist(), strict=True))
            # A zero weight (w_norm 0) gives no update ratio: leave it out, never NaN.
            out.append((p.it, {k: v for k, v in values.items() if math.isfinite(v)}))
        self.pending = []
        return out
