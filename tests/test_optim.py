"""Optimizers: Remark 2's two momentum forms, Remark 1's weight decay, LARS/LAMB wiring."""

from __future__ import annotations

import copy

import pydantic
import pytest
import pytorch_optimizer
import torch
from torch import nn

from trainer.norms import FilterResponseNorm, GroupedBatchNorm
from trainer.optim import CaffeSGD, build_optimizer, decay_groups, set_lr
from trainer.spec import RunSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# An LR sequence with a warmup ramp, a plateau and a step drop: every kind of change.
LRS = [0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.04, 0.04, 0.004]


def net(frn: bool = True) -> nn.Module:
    """Linear, BN, ReLU, Linear, FRN (or ReLU), Linear.

    FRN over (B, C) inputs is close to sign(x) (gain ~1/sqrt(eps) near 0) and amplifies
    rounding differences chaotically, so trajectory comparisons use ``frn=False``.
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        GroupedBatchNorm(8, dims=0),
        nn.ReLU(),
        nn.Linear(8, 8, bias=False),
        FilterResponseNorm(8, dims=0) if frn else nn.ReLU(),
        nn.Linear(8, 3),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def spec(**kw: object) -> RunSpec:
    base: dict[str, object] = {"model": "mlp", "dataset": "synthetic", "weight_decay": 1e-3}
    base.update(kw)
    return RunSpec(**base)


def train(model: nn.Module, opt: torch.optim.Optimizer, lrs: list[float]) -> list[torch.Tensor]:
    """Weights after each step of the LR sequence on a fixed batch."""
    x, y = data()
    x = x.to(next(model.parameters()).dtype)
    history = []
    for lr in lrs:
        set_lr(opt, lr)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        history.append(torch.cat([p.detach().flatten().clone() for p in model.parameters()]))
    return history


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-14), (torch.float32, 1e-6)])
def test_caffe_form_with_correction_equals_pytorch_form(
    nesterov: bool, dtype: torch.dtype, tol: float
) -> None:
    """v = lr*u by induction: equal up to rounding (float64 shows it is an identity)."""
    m_ref, m_caffe = net(frn=False).to(dtype), net(frn=False).to(dtype)
    ref = train(m_ref, build_optimizer(m_ref, spec(nesterov=nesterov)), LRS)
    opt = build_optimizer(m_caffe, spec(nesterov=nesterov, momentum_form="caffe"))
    assert isinstance(opt, CaffeSGD)
    caffe = train(m_caffe, opt, LRS)
    for a, b in zip(caffe, ref, strict=True):
        assert rel(a, b) < tol


def test_caffe_form_without_correction_differs_right_after_an_lr_change() -> None:
    lrs = [0.1, 0.1, 0.1, 1.0, 1.0]
    m_ref, m_caffe = net(frn=False), net(frn=False)
    ref = train(m_ref, build_optimizer(m_ref, spec()), lrs)
    opt = build_optimizer(m_caffe, spec(momentum_form="caffe", momentum_correction=False))
    caffe = train(m_caffe, opt, lrs)
    # Same while the LR is constant...
    for step in range(3):
        assert rel(caffe[step], ref[step]) < 1e-6
    # ...then the buffer still holds 0.1-scaled velocity: the step after the change is
    # m*0.1*u + 1.0*g instead of 1.0*(m*u + g).
    assert rel(caffe[3], ref[3]) > 1e-3


def test_momentum_correction_is_saved_with_the_optimizer_state() -> None:
    """A resumed Caffe-form optimizer corrects its first step by the LR saved before."""
    m_a = net()
    opt_a = build_optimizer(m_a, spec(momentum_form="caffe"))
    train(m_a, opt_a, LRS[:4])
    m_b = copy.deepcopy(m_a)
    opt_b = build_optimizer(m_b, spec(momentum_form="caffe"))
    # Deep copy: load_state_dict keeps same-device tensors, the buffers would be shared.
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert all(g["last_lr"] == LRS[3] for g in opt_b.param_groups)
    a, b = train(m_a, opt_a, LRS[4:]), train(m_b, opt_b, LRS[4:])
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_weight_decay_skips_norm_parameters_and_biases() -> None:
    model = net()
    groups = decay_groups(model, 1e-3)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"0.weight", "3.weight", "5.weight"}
    assert groups[1]["weight_decay"] == 0.0
    everything = decay_groups(model, 1e-3, decay_norm_and_bias=True)
    assert len(everything) == 1 and len(everything[0]["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("form", ["pytorch", "caffe"])
def test_weight_decay_step_shrinks_only_conv_linear_weights(form: str) -> None:
    """With a zero gradient, one step is w <- w - lr*wd*w on decayed weights only."""
    lr, wd = 0.5, 0.01
    model = net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = build_optimizer(model, spec(weight_decay=wd, momentum_form=form))
    set_lr(opt, lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for name, p in model.named_parameters():
        if name in {"0.weight", "3.weight", "5.weight"}:
            torch.testing.assert_close(p.detach(), before[name] * (1 - lr * wd))
        else:
            assert torch.equal(p.detach(), before[name]), name
    model = net()
    opt = build_optimizer(model, spec(weight_decay=wd, weight_decay_norm=True))
    set_lr(opt, lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert not torch.equal(model[1].weight.detach(), before["1.weight"])


def test_weight_decay_is_not_loss_scaling() -> None:
    """Remark 1: doubling the loss equals doubling the LR only without weight decay."""

    def run(wd: float, lr: float, loss_scale: float) -> torch.Tensor:
        model = net()
        opt = build_optimizer(model, spec(weight_decay=wd, momentum=0.0))
        x, y = data()
        for _ in range(3):
            set_lr(opt, lr)
            opt.zero_grad()
            (loss_scale * nn.functional.cross_entropy(model(x), y)).backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    torch.testing.assert_close(run(0.0, 0.2, 1.0), run(0.0, 0.1, 2.0))
    assert rel(run(0.05, 0.2, 1.0), run(0.05, 0.1, 2.0)) > 1e-3


def test_nesterov_without_momentum_is_refused() -> None:
    # Refused when the spec is validated, naming the field ...
    with pytest.raises(pydantic.ValidationError) as err:
        spec(nesterov=True, momentum=0.0)
    assert [e["loc"] for e in err.value.errors()] == [("nesterov",)]


def test_lars_uses_trust_ratio_and_group_weight_decay() -> None:
    model = net()
    opt = build_optimizer(model, spec(optimizer="lars", momentum=0.0, weight_decay=0.01))
    assert isinstance(opt, pytorch_optimizer.LARS)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    w = model[0].weight
    x, y = data()
    nn.functional.cross_entropy(model(x), y).backward()
    w0, g0 = w.detach().clone(), w.grad.detach().clone()
    set_lr(opt, 2.0)
    opt.step()
    # LARS (You et al. 2017): step = lr * eta*||w|| / (||g|| + wd||w||) * (g + wd*w).
    trust = 1e-3 * w0.norm() / (g0.norm() + 0.01 * w0.norm())
    torch.testing.assert_close(w.detach(), w0 - 2.0 * trust * (g0 + 0.01 * w0))


def test_lamb_is_built_and_follows_the_lr() -> None:
    model = net()
    opt = build_optimizer(model, spec(optimizer="lamb"))
    assert isinstance(opt, pytorch_optimizer.Lamb)
    before = [p.detach().clone() for p in model.parameters()]
    steps = train(model, opt, [1e-3, 1e-3])
    assert all(g["lr"] == 1e-3 for g in opt.param_groups)
    assert torch.isfinite(steps[-1]).all()
    assert not torch.equal(steps[-1], torch.cat([b.flatten() for b in before]))
