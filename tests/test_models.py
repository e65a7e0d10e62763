"""Model shapes, parameter counts, initialisation and the resnet50 dependency path."""

from __future__ import annotations

import builtins
import importlib.util
import math
import sys
import types

import pytest
import torch
from torch import nn

from trainer.models import MNIST1DCNN, ResNet20, build_model
from trainer.norms import NORM_LAYER_TYPES, CrossIterationBatchNorm, set_group_size
from trainer.spec import RunSpec, input_shape

NORMS = ["bn_local", "bn_ghost", "bn_sync", "frn", "cbn", "gn", "none"]
# model -> (dataset giving its input, extra spec fields)
MODELS = {
    "mlp": ("synthetic", {}),
    "mnist1d_cnn": ("mnist1d", {}),
    "simple_cnn": ("mnist", {"data_root": "/unused", "dataset_size": 64}),
    "resnet20": ("cifar10", {"data_root": "/unused", "dataset_size": 64}),
}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _spec(model: str, norm: str = "bn_local", **extra) -> RunSpec:
    dataset, fields = MODELS[model]
    ghost = {"ghost_batch": 2} if norm == "bn_ghost" else {}
    return RunSpec(
        model=model,
        dataset=dataset,
        norm=norm,
        workers=2,
        batch_per_worker=4,
        **fields,
        **ghost,
        **extra,
    )


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("model", list(MODELS))
def test_forward_backward_shapes(model: str, norm: str) -> None:
    spec = _spec(model, norm)
    net = build_model(spec, num_classes=7)
    x = torch.randn(8, *input_shape(spec))  # k * n = 2 workers x 4 samples
    for _ in range(2):  # twice: cbn uses its history on the second step
        out = net(x)
        assert out.shape == (8, 7)
        out.square().mean().backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    net.eval()
    assert net(x[:3]).shape == (3, 7)  # eval: any batch size


def test_mlp_flattens_images() -> None:
    spec = RunSpec(
        model="mlp", dataset="mnist", data_root="/unused", dataset_size=64, batch_per_worker=8
    )
    net = build_model(spec)
    assert net.fc1.in_features == 28 * 28
    assert net(torch.randn(8, 1, 28, 28)).shape == (8, 10)


def test_mnist1d_cnn_matches_paper_design() -> None:
    # The MNIST-1D paper's ConvBase: 3 Conv1d with 25 channels, then Linear(125 -> 10).
    conv_params = (1 * 25 * 5 + 25) + 2 * (25 * 25 * 3 + 25)
    linear_params = 125 * 10 + 10
    net = build_model(_spec("mnist1d_cnn", "none"))
    assert isinstance(net, MNIST1DCNN)
    assert sum(p.numel() for p in net.parameters()) == conv_params + linear_params == 5210
    # 40 -> 19 -> 10 -> 5 positions, as padding 1 with strides 2 gives.
    x = torch.randn(2, 1, 40)
    lengths = []
    for conv in (net.conv1, net.conv2, net.conv3):
        x = conv(x)
        lengths.append(x.shape[-1])
    assert lengths == [19, 10, 5]
    # With BN the convs lose their (redundant) bias and each BN adds gamma and beta.
    bn = build_model(_spec("mnist1d_cnn", "bn_local"))
    assert sum(p.numel() for p in bn.parameters()) == 5210 - 3 * 25 + 3 * 2 * 25


def test_simple_cnn_is_the_seed_model() -> None:
    net = build_model(_spec("simple_cnn", "none"))
    convs = [
        (m.in_channels, m.out_channels, m.kernel_size)
        for m in net.modules()
        if isinstance(m, nn.Conv2d)
    ]
    assert convs == [(1, 10, (5, 5)), (10, 20, (5, 5)), (20, 40, (3, 3))]
    assert (net.fc.in_features, net.fc.out_features) == (40, 10)
    assert not any(isinstance(m, NORM_LAYER_TYPES) for m in net.modules())


def test_resnet20_size_and_layout() -> None:
    net = build_model(_spec("resnet20"))
    assert isinstance(net, ResNet20)
    assert len(net.layers) == 9
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convs + the classifier: ResNet-20
    # He et al. 2016 report 0.27M parameters for ResNet-20 (option A shortcuts).
    assert round(sum(p.numel() for p in net.parameters()) / 1e4) == 27


@pytest.mark.parametrize("norm", ["bn_local", "gn", "frn", "cbn"])
def test_zero_init_blocks_start_as_identity(norm: str) -> None:
    net = build_model(_spec("resnet20", norm, zero_init_residual=True))
    x = torch.randn(8, 16, 32, 32)
    for block in net.layers:
        out = block(x)
        torch.testing.assert_close(out, torch.relu(block.shortcut(x)))
        x = out
    off = build_model(_spec("resnet20", norm, zero_init_residual=False))
    block = off.layers[0]
    x = torch.randn(8, 16, 32, 32)
    assert not torch.allclose(block(x), torch.relu(block.shortcut(x)))


def test_classifier_and_conv_init() -> None:
    torch.manual_seed(0)
    net = build_model(_spec("resnet20"))
    assert abs(net.fc.weight.std().item() - 0.01) < 0.003
    assert torch.count_nonzero(net.fc.bias) == 0
    conv = net.layers[8].conv1  # 64 -> 64, 3x3: He init std sqrt(2 / fan_out)
    assert abs(conv.weight.std().item() / math.sqrt(2 / (64 * 9)) - 1) < 0.05


@pytest.mark.parametrize("model", list(MODELS))
def test_cbn_wired_to_preceding_layer(model: str) -> None:
    net = build_model(_spec(model, "cbn"))
    cbns = [m for m in net.modules() if isinstance(m, CrossIterationBatchNorm)]
    assert cbns
    for m in cbns:
        assert m._prev is not None and m._prev.weight.shape[0] == m.num_features


def test_group_size_is_per_worker_by_default() -> None:
    net = build_model(_spec("mnist1d_cnn", "bn_local"))
    x = torch.randn(8, 40)
    x[4:] = x[4:] * 5 + 3  # second worker's samples on another scale
    y_grouped = net(x)
    # Per-worker BN: worker 0's outputs do not depend on worker 1's samples.
    x2 = x.clone()
    x2[4:] = torch.randn(4, 40)
    torch.testing.assert_close(net(x2)[:4], y_grouped[:4])
    set_group_size(net, None)  # whole-batch BN: now they do
    assert not torch.allclose(net(x2)[:4], net(x)[:4])


def test_resnet50_without_torchvision_says_what_to_install(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("No module named 'torchvision'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    spec = RunSpec(model="resnet50", dataset="synthetic", batch_per_worker=8)
    with pytest.raises(RuntimeError, match=r"vision.*extra|extra.*vision"):
        build_model(spec)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed (vision extra)")
@pytest.mark.parametrize("norm", ["bn_local", "none"])
def test_resnet50_builds(norm: str) -> None:
    spec = RunSpec(model="resnet50", dataset="synthetic", norm=norm, batch_per_worker=2)
    net = build_model(spec, num_classes=5)
    assert net(torch.randn(2, 3, 224, 224)).shape == (2, 5)
    if norm == "bn_local":
        from torchvision.models.resnet import Bottleneck

        blocks = [m for m in net.modules() if isinstance(m, Bottleneck)]
        assert all(torch.count_nonzero(b.bn3.weight) == 0 for b in blocks)


def _torchvision_stand_in(monkeypatch) -> None:
    """torchvision's resnet50 interface, its fc left at nn.Linear's default init."""
    models = types.ModuleType("torchvision.models")
    resnet = types.ModuleType("torchvision.models.resnet")

    def resnet50(weights: None, num_classes: int, norm_layer: object) -> nn.Module:
        net = nn.Module()
        net.fc = nn.Linear(2048, num_classes)
        return net

    models.resnet50, resnet.Bottleneck = resnet50, type("Bottleneck", (nn.Module,), {})
    models.resnet = resnet
    tv = types.ModuleType("torchvision")
    tv.models = models
    for name, mod in [("torchvision", tv), ("torchvision.models", models),
                      ("torchvision.models.resnet", resnet)]:  # fmt: skip
        monkeypatch.setitem(sys.modules, name, mod)


def test_resnet50_classifier_is_drawn_from_normal_0_01(monkeypatch) -> None:
    """Goyal et al. sec. 5.1: the last FC from N(0, 0.01), not torchvision's default."""
    if not HAS_TORCHVISION:
        _torchvision_stand_in(monkeypatch)
    torch.manual_seed(0)
    spec = RunSpec(model="resnet50", dataset="synthetic", batch_per_worker=8)
    fc = build_model(spec, num_classes=100).fc
    assert abs(fc.weight.std().item() - 0.01) < 3e-4  # default init: 1/sqrt(3*2048) = 0.0128
    assert abs(fc.weight.mean().item()) < 3e-4 and torch.count_nonzero(fc.bias) == 0


def test_bad_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        build_model(_spec("mlp"), num_classes=1)
