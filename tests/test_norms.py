"""Normalization layers: grouped/synced BN against nn.BatchNorm, FRN, CBN, factories."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from trainer.norms import (
    NORM_LAYER_TYPES,
    CrossIterationBatchNorm,
    FilterResponseNorm,
    GroupedBatchNorm,
    make_norm,
    make_norm_act,
    norm_group_size,
    set_group_size,
)
from trainer.spec import RunSpec

C = 5
SHAPES = {  # dims -> (input shape without batch, matching torch BN class)
    0: ((C,), nn.BatchNorm1d),
    1: ((C, 7), nn.BatchNorm1d),
    2: ((C, 4, 3), nn.BatchNorm2d),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _randomize_affine(*mods: nn.Module) -> None:
    gen = torch.Generator().manual_seed(7)
    w, b = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen)
    for m in mods:
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)


def _grads(mod: nn.Module, x: torch.Tensor, w_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    y = mod(x)
    (y * w_out).sum().backward()
    return y.detach(), x.grad, mod.weight.grad.clone(), mod.bias.grad.clone()


# --- GroupedBatchNorm ---------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [0, 1, 2])
@pytest.mark.parametrize("group_size", [None, 12])
def test_whole_batch_equals_torch_batchnorm(dims: int, group_size: int | None) -> None:
    shape, ref_cls = SHAPES[dims]
    ours = GroupedBatchNorm(C, dims, momentum=0.1, group_size=group_size)
    ref = ref_cls(C, momentum=0.1)
    _randomize_affine(ours, ref)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # several steps: running statistics accumulate
        x = torch.randn(12, *shape, generator=gen) * 3 + 1
        w_out = torch.randn(12, *shape, generator=gen)
        for a, b in zip(_grads(ours, x, w_out), _grads(ref, x, w_out), strict=True):
            torch.testing.assert_close(a, b)
        ours.zero_grad()
        ref.zero_grad()
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    ours.eval()
    ref.eval()
    x = torch.randn(4, *shape, generator=gen)
    torch.testing.assert_close(ours(x), ref(x))
    # Same parameter and buffer names: checkpoints of either load into the other.
    assert ours.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("dims", [0, 1, 2])
def test_groups_equal_batchnorm_per_chunk(dims: int) -> None:
    """g = n over k chunks is the paper's per-worker BN: BN run on each chunk alone."""
    shape, ref_cls = SHAPES[dims]
    k, n = 3, 4
    ours = GroupedBatchNorm(C, dims, momentum=0.2, group_size=n)
    ref = ref_cls(C, momentum=0.2)
    _randomize_affine(ours, ref)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(k * n, *shape, generator=gen) * 2
    x[n : 2 * n] += 5.0  # chunks with different statistics, so mixing them would show
    w_out = torch.randn(k * n, *shape, generator=gen)

    y, gx, gw, gb = _grads(ours, x, w_out)

    xr = x.clone().requires_grad_(True)
    yr = torch.cat([ref(chunk) for chunk in xr.split(n)])
    (yr * w_out).sum().backward()
    torch.testing.assert_close(y, yr.detach())
    torch.testing.assert_close(gx, xr.grad)
    torch.testing.assert_close(gw, ref.weight.grad)
    torch.testing.assert_close(gb, ref.bias.grad)

    # Running stats: one update with the mean over chunks of each chunk's statistics.
    dims_r = [0, *range(2, x.dim())]
    chunk_mean = torch.stack([c.mean(dims_r) for c in x.split(n)]).mean(0)
    chunk_var = torch.stack([c.var(dims_r, unbiased=True) for c in x.split(n)]).mean(0)
    torch.testing.assert_close(ours.running_mean, 0.2 * chunk_mean)
    torch.testing.assert_close(ours.running_var, 0.8 + 0.2 * chunk_var)


def test_group_must_divide_batch() -> None:
    bn = GroupedBatchNorm(C, 1, group_size=4)
    with pytest.raises(ValueError, match="set_group_size"):
        bn(torch.randn(6, C, 3))
    with pytest.raises(ValueError, match="dims=2"):
        GroupedBatchNorm(C, 2)(torch.randn(4, C, 3))


def test_group_size_helpers() -> None:
    spec = RunSpec(workers=4, batch_per_worker=8)
    assert norm_group_size(spec) == 8
    assert norm_group_size(spec.model_copy(update={"norm": "bn_sync"})) is None
    ghost = RunSpec(norm="bn_ghost", ghost_batch=4, batch_per_worker=8)
    assert norm_group_size(ghost) == 4
    model = nn.Sequential(make_norm_act(spec, C, 1), make_norm_act(ghost, C, 1))
    assert [m.group_size for m in model.modules() if isinstance(m, GroupedBatchNorm)] == [8, 4]
    set_group_size(model, 2)
    assert [m.group_size for m in model.modules() if isinstance(m, GroupedBatchNorm)] == [2, 2]
    with pytest.raises(ValueError):
        set_group_size(model, 0)


@pytest.mark.parametrize("group_size", [None, 4])
def test_grouped_bn_runs_in_float64(group_size: int | None) -> None:
    bn = GroupedBatchNorm(C, dims=1, group_size=group_size).double()
    ref = nn.BatchNorm1d(C).double()
    x = torch.randn(8, C, 5, dtype=torch.float64)
    y = bn(x)
    assert y.dtype == torch.float64 and bn.running_mean.dtype == torch.float64
    chunks = x.split(group_size or 8)
    torch.testing.assert_close(y, torch.cat([ref.train()(c) for c in chunks]))


# --- synchronised BN over gloo ------------------------------------------------------------------
def _sync_worker(rank: int, world: int, init_file: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(3)
        x_full = torch.randn(2 * 6, C, 5, generator=gen) * 2 + 0.5
        x_full[6:] *= 3.0  # the ranks' batches differ, so local BN would not match
        w_full = torch.randn(2 * 6, C, 5, generator=gen)

        ours = GroupedBatchNorm(C, 1, momentum=0.1, sync=True)
        ref = nn.BatchNorm1d(C, momentum=0.1)
        _randomize_affine(ours, ref)

        xr = x_full.clone().requires_grad_(True)
        ref_y = ref(xr)
        (ref_y * w_full).sum().backward()

        part = slice(6 * rank, 6 * (rank + 1))
        y, gx, gw, gb = _grads(ours, x_full[part], w_full[part])
        torch.testing.assert_close(y, ref_y.detach()[part])
        torch.testing.assert_close(gx, xr.grad[part])
        # Parameter gradients are per-rank shares; DDP sums them, so the sum must match.
        for g in (gw, gb):
            dist.all_reduce(g)
        torch.testing.assert_close(gw, ref.weight.grad)
        torch.testing.assert_close(gb, ref.bias.grad)
        torch.testing.assert_close(ours.running_mean, ref.running_mean)
        torch.testing.assert_close(ours.running_var, ref.running_var)

        # Far from zero, sum(x^2) - sum(x)^2 / n would cancel in float32; ours stays exact.
        far = x_full + 3000.0
        with torch.no_grad():
            expected = ref(far)[part]
            torch.testing.assert_close(ours(far[part]), expected, atol=1e-3, rtol=0)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_bn_over_two_gloo_processes_equals_bn_on_concatenated_batch(tmp_path) -> None:
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "pg_init")), nprocs=2, join=True)


# --- FilterResponseNorm ---------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [0, 1, 2])
def test_frn_matches_formula_and_is_batch_independent(dims: int) -> None:
    shape, _ = SHAPES[dims]
    frn = FilterResponseNorm(C, dims, eps=1e-6, tlu=True)
    with torch.no_grad():
        frn.weight.uniform_(0.5, 2)
        frn.bias.normal_()
        frn.tau.normal_()
    x = torch.randn(6, *shape)
    spatial = tuple(range(2, x.dim()))
    nu2 = x.pow(2).mean(spatial, keepdim=True) if spatial else x.pow(2)
    bshape = (1, C) + (1,) * len(spatial)
    expected = frn.weight.view(bshape) * x / torch.sqrt(nu2 + 1e-6) + frn.bias.view(bshape)
    expected = torch.maximum(expected, frn.tau.view(bshape))
    torch.testing.assert_close(frn(x), expected)

    other = x.clone()
    other[1:] = torch.randn_like(other[1:]) * 10
    torch.testing.assert_close(frn(other)[0], frn(x)[0])


def test_frn_learnable_eps_and_plain() -> None:
    frn = FilterResponseNorm(C, 0, tlu=False, learnable_eps=True)
    x = torch.randn(4, C)
    expected = x / torch.sqrt(x * x + 1e-6 + 1e-4)
    torch.testing.assert_close(frn(x), expected)
    assert {n for n, _ in frn.named_parameters()} == {"weight", "bias", "eps_l"}


# --- CrossIterationBatchNorm ----------------------------------------------------------------------
def _cbn_pair(window: int, group_size: int | None = None, conv: bool = False):
    torch.manual_seed(0)
    layer = nn.Conv1d(3, C, 3, bias=False) if conv else nn.Linear(6, C, bias=False)
    cbn = CrossIterationBatchNorm(C, 1, momentum=0.1, window=window, group_size=group_size)
    cbn.attach(layer)
    return layer, cbn


def _inputs(conv: bool, b: int = 8) -> torch.Tensor:
    return torch.randn(b, 3, 9) if conv else torch.randn(b, 6)


def test_cbn_window_one_is_batchnorm() -> None:
    layer, cbn = _cbn_pair(window=1)
    ref_layer, ref = copy.deepcopy(layer), nn.BatchNorm1d(C, momentum=0.1)
    for _ in range(3):
        x = torch.randn(8, 6)
        w_out = torch.randn(8, C)
        (cbn(layer(x)) * w_out).sum().backward()
        (ref(ref_layer(x)) * w_out).sum().backward()
        torch.testing.assert_close(layer.weight.grad, ref_layer.weight.grad)
        torch.testing.assert_close(cbn.weight.grad, ref.weight.grad)
        with torch.no_grad():  # an SGD step, so later iterations see new weights
            for p in (layer.weight, ref_layer.weight):
                p -= 0.1 * p.grad
                p.grad = None
        cbn.zero_grad()
        ref.zero_grad()
    torch.testing.assert_close(cbn.running_mean, ref.running_mean)
    torch.testing.assert_close(cbn.running_var, ref.running_var)


def _plain_window_output(hs: list[torch.Tensor], cbn: CrossIterationBatchNorm) -> torch.Tensor:
    """BN of the last batch with the uncompensated average of the window's statistics."""
    mus = torch.stack([h.mean(0) for h in hs])
    mx2 = torch.stack([h.pow(2).mean(0) for h in hs])
    mean, meansq = mus.mean(0), mx2.mean(0)
    var = meansq - mean**2
    return (hs[-1] - mean) / torch.sqrt(var + cbn.eps) * cbn.weight + cbn.bias


def test_cbn_frozen_weight_averages_window_plainly() -> None:
    layer, cbn = _cbn_pair(window=3)
    layer.weight.requires_grad_(False)
    hs = []
    for i in range(4):
        x = torch.randn(8, 6) + i  # different statistics per iteration
        h = layer(x).requires_grad_(True)
        hs.append(h.detach())
        y = cbn(h)
        if i < 2:  # window not filled yet: plain BN of the current batch
            torch.testing.assert_close(y, _plain_window_output(hs[-1:], cbn))
    torch.testing.assert_close(y, _plain_window_output(hs[-3:], cbn))


def _recomputed(layer: nn.Module, xs: list[torch.Tensor], groups: int):
    """Exact statistics of old batches recomputed with the current weight, (K, G, C)."""
    mus, mx2s = [], []
    with torch.no_grad():
        for x in xs:
            h = layer(x)
            h = h.reshape(groups, -1, C, h[0].numel() // C).transpose(2, 3).reshape(groups, -1, C)
            mus.append(h.mean(1))
            mx2s.append(h.pow(2).mean(1))
    return torch.stack(mus), torch.stack(mx2s)


@pytest.mark.parametrize(("conv", "group_size"), [(False, None), (True, None), (True, 4)])
def test_cbn_taylor_compensation(conv: bool, group_size: int | None) -> None:
    """Mean: linear in W, so compensation is exact. Mean of squares: error O(dW^2)."""
    errors = []
    for scale in (2e-3, 1e-3):
        layer, cbn = _cbn_pair(window=3, group_size=group_size, conv=conv)
        groups = 8 // (group_size or 8)
        xs = [_inputs(conv) for _ in range(2)]
        for x in reversed(xs):  # history holds newest first: xs[0] is the last iteration
            cbn(layer(x))
            with torch.no_grad():
                layer.weight.add_(scale * torch.randn_like(layer.weight))
        old_mu, old_mx2 = cbn._compensated_history(layer.weight)
        true_mu, true_mx2 = _recomputed(layer, xs, groups)
        torch.testing.assert_close(old_mu, true_mu, atol=1e-5, rtol=1e-5)
        stale = torch.stack([h[1] for h in cbn._history])  # uncompensated
        errors.append(((old_mx2 - true_mx2).abs().max(), (stale - true_mx2).abs().max()))
    (comp_big, stale_big), (comp_small, _) = errors
    assert comp_big < 0.2 * stale_big  # compensation removes most of the staleness
    assert 3.0 < comp_big / comp_small < 5.0  # second order: halving dW quarters the error


def test_cbn_drops_negative_variances() -> None:
    layer, cbn = _cbn_pair(window=2)
    x0 = torch.randn(8, 6)
    cbn(layer(x0))
    mu, mx2, dmu, dmx2, w = cbn._history[0]
    cbn._history[0] = (mu, mu * mu - 1.0, dmu, dmx2, w)  # an impossible old entry
    x1 = torch.randn(8, 6)
    h = layer(x1)
    y = cbn(h)
    torch.testing.assert_close(y, _plain_window_output([h.detach()], cbn))


def test_cbn_is_less_batch_dependent_than_bn() -> None:
    """How much sample 0's output moves when the rest of its batch changes."""
    torch.manual_seed(0)
    bn = CrossIterationBatchNorm(C, 0, window=1)
    cbn = CrossIterationBatchNorm(C, 0, window=4)
    for _ in range(3):
        cbn(torch.randn(8, C))  # fill the history
    x = torch.randn(8, C)
    other = x.clone()
    other[1:] = torch.randn(7, C) * 2 + 1

    def moved(m: CrossIterationBatchNorm) -> float:
        snapshot = list(m._history)
        a = m(x)[0]
        m._history = snapshot
        b = m(other)[0]
        return (a - b).abs().max().item()

    assert moved(cbn) < 0.6 * moved(bn)


def test_cbn_history_survives_state_dict() -> None:
    layer, cbn = _cbn_pair(window=3)
    for _ in range(3):
        cbn(layer(torch.randn(8, 6)))
    layer2, cbn2 = _cbn_pair(window=3)
    layer2.load_state_dict(layer.state_dict())
    cbn2.load_state_dict(cbn.state_dict())
    x = torch.randn(8, 6)
    torch.testing.assert_close(cbn2(layer2(x)), cbn(layer(x)))


def test_cbn_attach_checks_channels() -> None:
    cbn = CrossIterationBatchNorm(C, 0)
    with pytest.raises(ValueError, match="one row per channel"):
        cbn.attach(nn.Linear(3, C + 1))
    cbn.attach(nn.Linear(3, C))
    assert "_prev" not in dict(cbn.named_modules())  # not a submodule: no duplicated state


# --- factories --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("norm", "kinds"),
    [
        ("bn_local", (GroupedBatchNorm, nn.ReLU)),
        ("bn_sync", (GroupedBatchNorm, nn.ReLU)),
        ("cbn", (CrossIterationBatchNorm, nn.ReLU)),
        ("gn", (nn.GroupNorm, nn.ReLU)),
        ("frn", (FilterResponseNorm,)),
        ("none", (nn.ReLU,)),
    ],
)
def test_make_norm_act_layers(norm: str, kinds: tuple[type, ...]) -> None:
    spec = RunSpec(norm=norm, gn_groups=8)
    layer = make_norm_act(spec, 12, 1)
    found = [m for m in layer.modules() if not isinstance(m, nn.Sequential)]
    assert [type(m) for m in found] == list(kinds)
    assert layer(torch.randn(32, 12, 3)).shape == (32, 12, 3)
    plain = make_norm(spec, 12, 1)
    if norm == "none":
        assert isinstance(plain, nn.Identity)
    else:
        assert isinstance(plain, NORM_LAYER_TYPES)
    if norm == "frn":
        assert layer.tau is not None and plain.tau is None  # TLU only where ReLU was
    if norm == "gn":
        assert plain.num_groups == 6  # largest divisor of 12 not above gn_groups=8
    if norm == "bn_sync":
        assert plain.sync and plain.group_size is None
