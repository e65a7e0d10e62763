"""Layer health (trainer/health.py): hand-computed values on toy nets, the ReLU-to-layer
mapping, hooks only on measuring iterations, and the keys of real fit() runs."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainer import fit
from trainer.health import HealthProbe
from trainer.sink import MemorySink
from trainer.spec import RunSpec

pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


def _toy() -> nn.Sequential:
    """Linear(3, 4, no bias) -> ReLU -> Linear(4, 2), with weights chosen by hand."""
    net = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        net[0].weight.copy_(
            torch.tensor(
                [
                    [1.0, 0.0, 0.0],  # x0 > 0 in every sample: alive
                    [0.0, 1.0, 0.0],  # alive in sample 2 only
                    [-1.0, -1.0, 0.0],  # negative for every sample: dead
                    [0.0, 0.0, -2.0],  # x2 >= 0 everywhere: output 0, dead
                ]
            )
        )
        net[2].weight.copy_(torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 4.0]]))
        net[2].bias.zero_()
    return net


X = torch.tensor([[1.0, -1.0, 0.0], [2.0, 3.0, 1.0]])
Y = torch.tensor([0, 1])


def _measure(net: nn.Module, it: int = 0, every: int = 1, lr: float = 0.5) -> dict[str, float]:
    probe = HealthProbe(net, every)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    probe.begin(it)
    loss = F.cross_entropy(net(X), Y, reduction="sum") / len(X)
    loss.backward()
    probe.before_step(it, X, Y, torch.tensor(0.0))
    opt.step()
    probe.after_step(it)
    taken = probe.take()
    return taken[0][1] if taken else {}


def test_toy_net_values_by_hand() -> None:
    net = _toy()
    w1, w2 = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    loss = F.cross_entropy(net(X), Y)  # plain torch, for the gradient norms
    g1, g2 = torch.autograd.grad(loss, [net[0].weight, net[2].weight])
    values = _measure(net, lr=0.5)
    assert set(values) == {
        "health/0/dead",
        "health/0/w_norm",
        "health/0/g_norm",
        "health/0/update_ratio",
        "health/2/w_norm",
        "health/2/g_norm",
        "health/2/update_ratio",
    }  # the classifier has no ReLU after it: no dead fraction
    assert values["health/0/dead"] == 0.5  # units 2 and 3 of 4
    assert values["health/0/w_norm"] == pytest.approx(math.sqrt(1 + 1 + 2 + 4))
    assert values["health/2/w_norm"] == pytest.approx(math.sqrt(1 + 4 + 9 + 16))
    assert values["health/0/g_norm"] == pytest.approx(float(g1.norm()), rel=1e-6)
    assert values["health/2/g_norm"] == pytest.approx(float(g2.norm()), rel=1e-6)
    # Dead units pass no gradient: rows 2 and 3 of W1 get none (what kills them for good).
    assert torch.count_nonzero(g1[2:]) == 0
    # Plain SGD: the update is lr * grad.
    assert values["health/0/update_ratio"] == pytest.approx(
        0.5 * float(g1.norm()) / float(w1.norm()), rel=1e-6
    )
    assert values["health/2/update_ratio"] == pytest.approx(
        float((net[2].weight.detach() - w2).norm() / w2.norm()), rel=1e-6
    )


def test_hooks_only_on_measuring_iterations() -> None:
    net = _toy()
    probe = HealthProbe(net, every=4)
    probe.begin(0)  # iteration 0: (0 + 1) % 4 != 0
    assert not net[0]._forward_hooks and not net[1]._forward_hooks
    assert _measure(_toy(), it=2, every=4) == {}
    probe.begin(3)
    assert net[0]._forward_hooks and net[1]._forward_hooks
    probe.before_step(3, X, Y, torch.tensor(0.0))
    assert not any(m._forward_hooks for m in net.modules())  # removed after the forward
    assert _measure(_toy(), it=3, every=4)["health/0/dead"] == 0.5


def test_dead_means_dead_in_every_chunk() -> None:
    """A unit zero in one micro-batch but not in another is alive."""
    net = _toy()
    probe = HealthProbe(net, 1)
    probe.begin(0)
    for a in (0, 1):  # sample 0 alone: unit 1 is zero; sample 1 revives it
        net(X[a : a + 1]).sum().backward()
    probe.before_step(0, X, Y, torch.tensor(0.0))
    probe.after_step(0)
    assert probe.take()[0][1]["health/0/dead"] == 0.5


class _Bottleneck(nn.Module):
    """torchvision's pattern: one ReLU module called three times, downsample after conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 1)
        self.conv3 = nn.Conv2d(3, 4, 1)
        self.downsample = nn.Sequential(nn.Conv2d(2, 4, 1))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv1(x))
        out = self.conv3(out)
        return self.relu(out + self.downsample(x))


def test_relu_maps_to_the_first_layer_since_the_last_relu() -> None:
    torch.manual_seed(0)
    block = _Bottleneck()
    with torch.no_grad():  # every output channel of the block negative: all dead
        block.conv3.bias.fill_(-100.0)
    probe = HealthProbe(block, 1)
    probe.begin(0)
    x = torch.randn(4, 2, 3, 3)
    block(x).sum().backward()
    probe.before_step(0, x, x, torch.tensor(0.0))
    probe.after_step(0)
    values = probe.take()[0][1]
    assert values["health/conv3/dead"] == 1.0  # the block's last ReLU belongs to conv3
    assert "health/conv1/dead" in values
    assert "health/downsample.0/dead" not in values
    assert "health/downsample.0/w_norm" in values


# --- real runs -------------------------------------------------------------------------------
def _fit(**kw: Any) -> MemorySink:
    spec = RunSpec(
        device="cpu",
        epochs=1,
        warmup="none",
        milestones=[],
        noise_every=0,
        checkpoint=False,
        **kw,
    )
    sink = MemorySink()
    assert fit(spec, sink).status == "succeeded"
    return sink


def test_mnist1d_cnn_keys_in_a_real_run() -> None:
    sink = _fit(
        model="mnist1d_cnn",
        dataset="synthetic",
        dataset_size=400,
        workers=4,
        batch_per_worker=16,
        health_every=2,
    )
    health = {k for k, *_ in sink.points if k.startswith("health/")}
    assert health == {
        f"health/{layer}/{stat}"
        for layer in ("conv1", "conv2", "conv3", "fc")
        for stat in ("dead", "w_norm", "g_norm", "update_ratio")
        if (layer, stat) != ("fc", "dead")
    }
    assert sink.steps("health/conv3/dead") == [1, 3]  # 5 iterations, every 2nd
    values = [v for k, *_, v in sink.points if k.startswith("health/")]
    assert all(math.isfinite(v) and v >= 0 for v in values)
    assert all(0 <= v <= 1 for v in sink.series("health/conv1/dead"))
    assert all(v > 0 for v in sink.series("health/conv1/update_ratio"))


def test_resnet20_keys_in_a_real_run() -> None:
    sink = _fit(
        model="resnet20",
        dataset="synthetic",
        dataset_size=80,
        workers=2,
        batch_per_worker=8,
        health_every=3,
    )
    keys = {k for k, *_ in sink.points if k.startswith("health/")}
    convs = ["conv1"] + [f"layers.{b}.conv{c}" for b in range(9) for c in (1, 2)]
    for layer in convs:  # every conv has a ReLU after it (conv2: the block's output)
        assert {f"health/{layer}/{s}" for s in ("dead", "w_norm", "g_norm", "update_ratio")} <= keys
    assert "health/fc/dead" not in keys and "health/fc/w_norm" in keys
    assert len(keys) == 4 * len(convs) + 3
    assert sink.steps("health/fc/g_norm") == [2]  # 4 iterations, every 3rd
