"""The networks a run can train, each with normalization layers chosen by ``spec.norm``.

``build_model(spec, num_classes)`` returns a freshly initialised model for inputs of shape
``trainer.spec.input_shape(spec)``. Layers that feed a mean-subtracting norm (batch norms,
cbn, GroupNorm) carry no bias: the norm's beta makes it redundant, and cbn's Taylor
compensation is taken in the preceding layer's weight only (as in the official code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from trainer.norms import attach_cbn, make_norm, make_norm_act
from trainer.spec import RunSpec, input_shape

__all__ = ["MLP", "MNIST1DCNN", "ResNet20", "SimpleCNN", "build_model", "uses_channels_last"]

# Models made of 2-D convolutions: on CUDA their weights and inputs go channels_last (NHWC),
# the layout cuDNN's tensor-core kernels read without transposing.
CONV2D_MODELS = frozenset({"simple_cnn", "resnet20", "resnet50"})


def _bias(spec: RunSpec) -> bool:
    """Whether a conv/linear layer before a norm needs its own bias."""
    return spec.norm in ("none", "frn")


def _init_weights(model: nn.Module, classifier: nn.Linear) -> None:
    """He (Kaiming) init for convs and hidden linears; the classifier from N(0, 0.01).

    Goyal et al. sec. 5.1 use He et al.'s init for convs and a zero-mean Gaussian with
    standard deviation 0.01 for the final fully connected layer.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv1d | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear) and m is not classifier:
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        else:
            continue
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    nn.init.normal_(classifier.weight, std=0.01)
    nn.init.zeros_(classifier.bias)


class MLP(nn.Module):
    """flatten -> Linear(d, 256) -> norm/act -> Linear(256, 256) -> norm/act -> Linear."""

    def __init__(self, spec: RunSpec, in_features: int, num_classes: int, width: int = 256):
        super().__init__()
        self.fc1 = nn.Linear(in_features, width, bias=_bias(spec))
        self.act1 = make_norm_act(spec, width, 0)
        self.fc2 = nn.Linear(width, width, bias=_bias(spec))
        self.act2 = make_norm_act(spec, width, 0)
        self.fc = nn.Linear(width, num_classes)
        _init_weights(self, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x.flatten(1)))
        return self.fc(self.act2(self.fc2(x)))


class MNIST1DCNN(nn.Module):
    """The CNN of the MNIST-1D paper (Greydanus 2020, ``ConvBase`` of its repository).

    (B, 40) -> (B, 1, 40) -> three Conv1d of 25 channels (k5 s2, k3 s2, k3 s2, padding 1:
    40 -> 19 -> 10 -> 5) each followed by norm/act -> flatten (125) -> Linear. With
    ``norm='none'`` it is the original ReLU network (5,210 parameters for 10 classes).
    """

    def __init__(self, spec: RunSpec, num_classes: int, channels: int = 25):
        super().__init__()
        bias = _bias(spec)
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1, bias=bias)
        self.act1 = make_norm_act(spec, channels, 1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=bias)
        self.act2 = make_norm_act(spec, channels, 1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1, bias=bias)
        self.act3 = make_norm_act(spec, channels, 1)
        self.fc = nn.Linear(channels * 5, num_classes)
        _init_weights(self, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, -1)
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        x = self.act3(self.conv3(x))
        return self.fc(x.flatten(1))


class SimpleCNN(nn.Module):
    """``SimpleModel`` of seed 004 (a PyTorch MNIST batch-size study), for 1x28x28 inputs.

    Taken from the seed: conv(1->10, k5) -> maxpool 2 -> ReLU; conv(10->20, k5) -> maxpool
    2 -> ReLU; conv(20->40, k3) -> maxpool 2 -> ReLU; flatten (40 x 1 x 1) -> Linear(40,
    10). The seed has no normalization: each ReLU here becomes ``spec.norm``'s norm + act
    (after the pooling, where the seed's ReLU sits), so ``norm='none'`` is the seed's net.
    Changed: it returns logits, not ``log_softmax`` (the loop's cross-entropy applies it;
    the loss is the same), and the seed's debugging ``print`` is gone.
    """

    def __init__(self, spec: RunSpec, num_classes: int):
        super().__init__()
        bias = _bias(spec)
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5, bias=bias)
        self.act1 = make_norm_act(spec, 10, 2)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5, bias=bias)
        self.act2 = make_norm_act(spec, 20, 2)
        self.conv3 = nn.Conv2d(20, 40, kernel_size=3, bias=bias)
        self.act3 = make_norm_act(spec, 40, 2)
        self.fc = nn.Linear(40, num_classes)
        _init_weights(self, self.fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(F.max_pool2d(self.conv1(x), 2))  # 28 -> 24 -> 12
        x = self.act2(F.max_pool2d(self.conv2(x), 2))  # 12 -> 8 -> 4
        x = self.act3(F.max_pool2d(self.conv3(x), 2))  # 4 -> 2 -> 1
        return self.fc(x.flatten(1))


class BasicBlock(nn.Module):
    """conv3x3 -> norm/act -> conv3x3 -> norm, plus the shortcut, then ReLU.

    The shortcut is He et al.'s option A for CIFAR (parameter free): identity, or
    subsampling by the stride with the new channels zero-padded.
    """

    def __init__(self, spec: RunSpec, c_in: int, c_out: int, stride: int):
        super().__init__()
        bias = _bias(spec)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)
        self.act1 = make_norm_act(spec, c_out, 2)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=bias)
        self.norm2 = make_norm(spec, c_out, 2)
        self.stride, self.pad = stride, c_out - c_in
        self.relu = nn.ReLU()  # a module, so trainer/health.py can hook it (no state)

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.act1(self.conv1(x))))
        return self.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet-20: conv, 3 stages (16/32/64) of 3 basic blocks, GAP."""

    def __init__(self, spec: RunSpec, num_classes: int, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=_bias(spec))
        self.act1 = make_norm_act(spec, 16, 2)
        layers: list[nn.Module] = []
        c_in = 16
        for stage, c_out in enumerate((16, 32, 64)):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(BasicBlock(spec, c_in, c_out, stride))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self, self.fc)
        if spec.zero_init_residual:
            for block in self.layers:
                _zero_gamma(block.norm2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.act1(self.conv1(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _zero_gamma(norm: nn.Module) -> None:
    """Start a residual block's last norm at gamma = 0 (Goyal et al. sec. 5.1)."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        nn.init.zeros_(weight)


def _resnet50(spec: RunSpec, num_classes: int) -> nn.Module:
    try:
        from torchvision.models import resnet50
        from torchvision.models.resnet import Bottleneck
    except ImportError as exc:
        raise RuntimeError(
            "model 'resnet50' needs torchvision, which is not installed: install the "
            "'vision' extra (pip install 'batchlab[vision]')"
        ) from exc

    norm_layer: Callable[[int], nn.Module] = lambda c: make_norm(spec, c, 2)  # noqa: E731
    # torchvision's own zero_init_residual assumes bn3 has a weight (norm='none' has
    # not), so the zero init is done here.
    model = resnet50(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    # torchvision keeps nn.Linear's default init for fc; the paper draws it from N(0, 0.01).
    nn.init.normal_(model.fc.weight, std=0.01)
    nn.init.zeros_(model.fc.bias)
    if spec.zero_init_residual:
        for m in model.modules():
            if isinstance(m, Bottleneck):
                _zero_gamma(m.bn3)
    return model


def uses_channels_last(spec: RunSpec, device: torch.device) -> bool:
    """Whether a run keeps its model and inputs channels_last: 2-D conv models on CUDA
    (on the CPU the layout gains little and some norms' reshapes undo it)."""
    return device.type == "cuda" and spec.model in CONV2D_MODELS


def build_model(spec: RunSpec, num_classes: int = 10) -> nn.Module:
    """A freshly initialised ``spec.model`` for ``input_shape(spec)`` and num_classes."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    shape = input_shape(spec)
    if spec.model == "mlp":
        model: nn.Module = MLP(spec, math.prod(shape), num_classes)
    elif spec.model == "mnist1d_cnn":
        model = MNIST1DCNN(spec, num_classes)
    elif spec.model == "simple_cnn":
        model = SimpleCNN(spec, num_classes)
    elif spec.model == "resnet20":
        model = ResNet20(spec, num_classes)
    elif spec.model == "resnet50":
        model = _resnet50(spec, num_classes)
    else:
        raise ValueError(f"model: unknown architecture {spec.model!r}")
    if spec.norm == "cbn":
        attach_cbn(model)
    return model
