"""LARS and LAMB adapt and decay conv/linear weights only (issue 13, part 4).

Every expected step is computed here by hand from the papers' formulas and compared with
what pytorch-optimizer's classes, as ``build_optimizer`` wires them, do to a tiny
Conv1d -> BN -> ReLU -> Linear network: the weights get the trust ratio (and weight
decay), BN gamma/beta and the biases get the base method's plain step.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from trainer.models import build_model
from trainer.norms import GroupedBatchNorm
from trainer.optim import build_optimizer, layerwise_optimizer, set_lr
from trainer.spec import Model, Norm, RunSpec

WD = 0.01
LRS = [0.5, 2.0, 1.0]  # a change of LR between steps, as warmup makes


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(1, 4, 3, bias=True),
        GroupedBatchNorm(4, dims=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6, 3),
    )


def spec(**kw: object) -> RunSpec:
    base: dict[str, object] = {"model": "mlp", "dataset": "synthetic", "weight_decay": WD}
    return RunSpec(**{**base, **kw})


def steps(
    model: nn.Module, opt: torch.optim.Optimizer
) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """For each LR of LRS: (weights, gradients) before the step; the step is then taken."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 8, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    for lr in LRS:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        named = dict(model.named_parameters())
        before = {k: p.detach().clone() for k, p in named.items()}
        grads = {k: p.grad.detach().clone() for k, p in named.items()}
        set_lr(opt, lr)
        yield before, grads
        opt.step()


ADAPTED = ["0.weight", "4.weight"]  # conv and linear weights
PLAIN = ["0.bias", "1.weight", "1.bias", "4.bias"]  # conv bias, BN gamma/beta, fc bias


def test_lars_adapts_weights_and_steps_norm_and_bias_by_plain_momentum_sgd() -> None:
    model = net()
    opt = build_optimizer(model, spec(optimizer="lars", momentum=0.9))
    eta, m = 1e-3, 0.9  # the paper's trust coefficient (the library's default)
    bufs: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    trust_seen = []
    named = dict(model.named_parameters())
    for (w, g), lr in zip(steps(model, opt), LRS, strict=True):
        for k in named:
            torch.testing.assert_close(named[k].detach(), expected.get(k, w[k]))
            if k in ADAPTED:
                # You et al. 2017: local LR eta ||w|| / (||g|| + beta ||w||) times (g + beta w)
                trust = eta * w[k].norm() / (g[k].norm() + WD * w[k].norm())
                trust_seen.append(float(trust))
                u = trust * (g[k] + WD * w[k])
            else:
                u = g[k]  # no trust ratio, no weight decay
            bufs[k] = m * bufs[k] + u if k in bufs else u
            expected[k] = w[k] - lr * bufs[k]
    for k, p in named.items():
        torch.testing.assert_close(p.detach(), expected[k])
    # The trust ratio really scales (far from 1), so the two rules are told apart.
    assert max(trust_seen) < 0.1


def test_lamb_adapts_weights_and_steps_norm_and_bias_by_plain_adam() -> None:
    model = net()
    opt = build_optimizer(model, spec(optimizer="lamb"))
    b1, b2, eps = 0.9, 0.999, 1e-6  # the library's defaults (the paper's betas and eps)
    mom: dict[str, torch.Tensor] = {}
    var: dict[str, torch.Tensor] = {}
    expected: dict[str, torch.Tensor] = {}
    ratios = []
    named = dict(model.named_parameters())
    for (w, g), lr in zip(steps(model, opt), LRS, strict=True):
        for k in named:
            torch.testing.assert_close(named[k].detach(), expected.get(k, w[k]))
            mom[k] = b1 * mom.get(k, torch.zeros_like(g[k])) + (1 - b1) * g[k]
            var[k] = b2 * var.get(k, torch.zeros_like(g[k])) + (1 - b2) * g[k] ** 2
            r = mom[k] / (var[k].sqrt() + eps)  # no bias correction (the library's form)
            if k in ADAPTED:
                # You et al. 2019, Alg. 2: decay inside the update the trust ratio divides.
                u = r + WD * w[k]
                ratio = w[k].norm() / (u.norm() + eps)
                ratios.append(float(ratio))
                expected[k] = w[k] - lr * ratio * u
            else:
                expected[k] = w[k] - lr * r  # trust ratio 1, no weight decay
    for k, p in named.items():
        torch.testing.assert_close(p.detach(), expected[k])
    assert max(ratios) < 0.5


def test_lamb_decays_norm_and_bias_without_adapting_them_on_request() -> None:
    model = net()
    opt = build_optimizer(model, spec(optimizer="lamb", weight_decay_norm=True))
    assert [(g["weight_decay"], g["adam"]) for g in opt.param_groups] == [
        (WD, False),
        (WD, True),
    ]
    gamma = model[1].weight
    with torch.no_grad():
        gamma.mul_(3.0)  # ||gamma|| = 6: a trust ratio would change the step a lot
    (w, g), lr = next(steps(model, opt)), LRS[0]
    opt.step()
    r = (0.1 * g["1.weight"]) / ((0.001 * g["1.weight"] ** 2).sqrt() + 1e-6)
    torch.testing.assert_close(gamma.detach(), w["1.weight"] - lr * (r + WD * w["1.weight"]))


def test_lars_refuses_to_decay_norm_and_bias_naming_the_field() -> None:
    # The library never decays 1-D tensors: asking for it must not be ignored silently.
    with pytest.raises(ValueError, match="weight_decay_norm"):
        build_optimizer(net(), spec(optimizer="lars", weight_decay_norm=True))


def test_lars_refuses_a_split_its_ndim_rule_would_not_follow() -> None:
    # PReLU's weight is 1-D but neither a norm parameter nor a bias: LARS would neither
    # adapt nor decay it although the split says "weight".
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"optimizer: .*\(1,\)"):
        layerwise_optimizer(model, "lars", 0.1, weight_decay=WD)
    with pytest.raises(ValueError, match="optimizer: 'adam'"):
        layerwise_optimizer(net(), "adam", 0.1, weight_decay=WD)


@pytest.mark.parametrize("model_name", ["mlp", "mnist1d_cnn", "simple_cnn", "resnet20"])
@pytest.mark.parametrize("norm", ["bn_local", "frn", "gn", "cbn", "none"])
def test_every_batchlab_model_builds_lars_and_lamb_with_all_norm_params_unadapted(
    model_name: Model, norm: Norm
) -> None:
    dataset = "mnist1d" if model_name in ("mlp", "mnist1d_cnn") else "synthetic"
    for optimizer in ("lars", "lamb"):
        s = spec(model=model_name, dataset=dataset, norm=norm, optimizer=optimizer)
        model = build_model(s)
        opt = build_optimizer(model, s)
        adapted = [p for g in opt.param_groups if not g.get("adam") for p in g["params"]]
        plain = [p for g in opt.param_groups if g.get("adam") for p in g["params"]]
        if optimizer == "lars":  # LARS's own rule: ndim > 1 is adapted and decayed
            adapted = [p for g in opt.param_groups if g["weight_decay"] for p in g["params"]]
            plain = [p for g in opt.param_groups if not g["weight_decay"] for p in g["params"]]
            assert all(p.ndim > 1 for p in adapted) and all(p.ndim <= 1 for p in plain)
        norm_ids = {
            id(p)
            for n, p in model.named_parameters()
            if n.endswith("bias") or p.ndim <= 1  # every 1-D tensor here is norm or bias
        }
        assert {id(p) for p in plain} == norm_ids
        assert len(adapted) + len(plain) == len(list(model.parameters()))


def test_lars_with_weight_decay_norm_is_refused_at_submission() -> None:
    """Refused by the spec (a 422 naming the field), not when the worker builds it."""
    from pydantic import ValidationError

    from trainer.spec import RunSpec

    with pytest.raises(ValidationError) as info:
        RunSpec(optimizer="lars", weight_decay_norm=True)
    assert info.value.errors()[0]["loc"] == ("weight_decay_norm",)
    assert RunSpec(optimizer="lamb", weight_decay_norm=True).weight_decay_norm
