"""backward_splits (seed 004, trainer/splits.py): one forward pass, m updates per kn batch."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_fit import params_of, run, tiny  # tiny: k=4, n=8 (kn=32), 5 batches an epoch

import trainer.data
import trainer.splits
from server.app import create_app
from trainer import fit
from trainer.batches import Layout, epoch_permutation
from trainer.checkpoint import load_checkpoint
from trainer.models import build_model
from trainer.norms import set_group_size
from trainer.schedule import Schedule
from trainer.sink import MemorySink
from trainer.spec import RunSpec

FORWARDS = 5  # 160 training samples / kn = 32


pytestmark = pytest.mark.usefixtures("batchlab_home", "one_torch_thread")


def test_one_split_is_the_plain_loop_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """m=1 never enters trainer/splits.py: the run is today's, bit for bit."""
    plain, _ = run(tiny(), tmp_path / "plain")

    def refuse(*_: Any) -> bool:
        raise AssertionError("backward_splits=1 went through trainer.splits")

    monkeypatch.setattr(trainer.splits, "train_epoch", refuse)
    one, result = run(tiny(backward_splits=1), tmp_path / "one")
    assert result.status == "succeeded" and result.iterations == 2 * FORWARDS
    for key in ("loss", "train_err", "lr", "samples", "grad_norm", "val_err", "val_loss"):
        assert one.series(key) == plain.series(key)
    a, b = params_of(tmp_path / "plain"), params_of(tmp_path / "one")
    assert all(torch.equal(a[name], b[name]) for name in a)
    layout = Layout.build(tiny(), 160, 40, 0, 1)
    assert (layout.iters_per_epoch, layout.forwards_per_epoch, layout.update_batch) == (5, 5, 32)


def test_two_splits_equal_a_hand_written_reference(tmp_path: Path) -> None:
    """Each kn batch: gradients of both chunks' mean loss at the forward's weights, then
    two SGD steps in order, each at its own update's LR.

    The reference forwards each chunk on its own through a frozen copy of the weights of
    the forward pass; with per-worker BN (groups of n) and chunks of whole workers, a
    chunk's loss depends on its own samples only, so this is the same gradient the one
    shared graph must give.
    """
    m, c = 2, 16
    spec = tiny(backward_splits=m, weight_decay=1e-3, weight_decay_norm=True)
    assert spec.iters_per_epoch == FORWARDS * m
    sink, result = run(spec, tmp_path)
    assert result.status == "succeeded" and result.iterations == 2 * FORWARDS * m

    torch.manual_seed(spec.seed)
    splits = trainer.data.load_datasets(spec)
    model = build_model(spec, num_classes=splits.num_classes)
    set_group_size(model, spec.batch_per_worker)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9, weight_decay=1e-3)
    x, y = splits.train.tensors
    ipe = FORWARDS * m
    warm, peak = ipe, spec.peak_lr  # gradual warmup over 1 epoch of updates
    losses, errs, norms, lrs = [], [], [], []
    for epoch in range(2):
        perm = epoch_permutation(spec.seed, epoch, len(x))
        for f in range(FORWARDS):
            frozen = copy.deepcopy(model)  # the weights of the forward pass
            grads = []
            for j in range(m):
                idx = perm[f * 32 + j * c : f * 32 + (j + 1) * c]
                out = frozen(x[idx])
                loss = F.cross_entropy(out, y[idx])  # the mean over the chunk's c samples
                grads.append(torch.autograd.grad(loss, list(frozen.parameters())))
                losses.append(loss.item())
                errs.append(int((out.argmax(1) != y[idx]).sum()) / c)
                norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads[-1]])))
            for j in range(m):
                u = epoch * ipe + f * m + j
                lr = 0.05 + (peak - 0.05) * u / warm if u < warm else peak
                lr *= 0.1 if u >= 16 else 1.0  # milestone 1.6 epochs = update 16
                lrs.append(lr)
                for p, g in zip(model.parameters(), grads[j], strict=True):
                    p.grad = g.clone()
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()

    assert sink.series("lr") == pytest.approx(lrs, rel=1e-12)
    assert sink.series("loss") == pytest.approx(losses, rel=1e-5)
    assert sink.series("train_err") == errs
    assert sink.series("grad_norm") == pytest.approx([n.item() for n in norms], rel=1e-5)
    assert sink.series("samples") == [float(c * (u + 1)) for u in range(2 * ipe)]
    assert sink.steps("loss") == list(range(2 * ipe))
    assert sink.steps("val_err") == [ipe - 1, 2 * ipe - 1]
    saved = params_of(tmp_path)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=1e-5, atol=1e-6)


def test_the_schedule_and_the_counters_count_updates() -> None:
    """Warmup and milestones are in epochs; an epoch has FORWARDS * m updates."""
    m = 4
    spec = tiny(backward_splits=m, epochs=3, milestones=[1.5, 2.25])
    sink, result = run(spec)
    ipe = FORWARDS * m
    schedule = Schedule.from_spec(spec)
    assert schedule == Schedule.from_spec(spec, ipe) and schedule.iters_per_epoch == ipe
    assert sink.series("lr") == [schedule.lr(u) for u in range(3 * ipe)]
    lrs = sink.series("lr")
    assert lrs[0] == 0.05 and lrs[ipe] == pytest.approx(0.2)  # warmup ends at epoch 1
    assert lrs[ipe + ipe // 2 - 1] == pytest.approx(0.2)
    assert lrs[ipe + ipe // 2] == pytest.approx(0.02)  # epoch 1.5 = update 30
    assert lrs[2 * ipe + ipe // 4] == pytest.approx(0.002)  # epoch 2.25 = update 45
    assert result.iterations == 3 * ipe and result.epochs == 3.0
    assert sink.meta["iters_per_epoch"] == ipe and sink.meta["total_iters"] == 3 * ipe
    assert sink.meta["warmup_iters"] == ipe and sink.meta["backward_splits"] == m
    assert spec.total_iters == 3 * ipe  # what the server and the form show
    steps = sink.steps("loss")
    assert steps == list(range(3 * ipe))
    assert [e for k, _, e, *_ in sink.points if k == "loss"][:2] == [1 / ipe, 2 / ipe]
    # Each update's step time shares its forward; they add up to the epoch's training time.
    times = sink.series("step_time")
    assert sum(times[:ipe]) == pytest.approx(sink.series("epoch_time")[0], rel=0.05)
    assert result.summary["samples_per_s"] == pytest.approx(
        3 * FORWARDS * 32 / sum(times), rel=1e-9
    )
    assert result.summary["total_batch"] == 32


def test_resume_continues_the_straight_run(tmp_path: Path) -> None:
    spec = tiny(backward_splits=2, epochs=3, milestones=[2.5])
    straight, done = run(spec, tmp_path / "a")
    ipe = FORWARDS * 2

    first = MemorySink()
    cancelled = fit(
        spec,
        first,
        run_dir=tmp_path / "b",
        should_stop=lambda: any(p[0] == "val_err" for p in first.points),
    )
    assert cancelled.status == "cancelled"
    state = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert state is not None
    epochs_done = state["epoch"]
    assert epochs_done in (1, 2) and state["iteration"] == epochs_done * ipe
    assert state["tracker"]["iterations"] >= epochs_done * ipe

    resumed, result = run(spec, tmp_path / "b")
    assert result.status == "succeeded" and result.iterations == 3 * ipe
    assert resumed.meta["start_step"] == epochs_done * ipe
    assert resumed.steps("loss") == list(range(epochs_done * ipe, 3 * ipe))
    assert resumed.series("loss") == straight.series("loss")[epochs_done * ipe :]  # bitwise
    assert resumed.series("lr") == straight.series("lr")[epochs_done * ipe :]
    a, b = params_of(tmp_path / "a"), params_of(tmp_path / "b")
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert result.summary["final_val_err"] == done.summary["final_val_err"]
    # Another m is another trajectory: the checkpoint is refused.
    with pytest.raises(ValueError, match="backward_splits"):
        run(tiny(backward_splits=4, epochs=3, milestones=[2.5]), tmp_path / "b")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"backward_splits": 3}, "must divide the total batch k*n = 32"),
        ({"backward_splits": 0}, "greater than or equal to 1"),
        ({"backward_splits": 65}, "less than or equal to 64"),
        ({"backward_splits": 2, "nproc": 2}, "set nproc=1"),
        ({"backward_splits": 2, "micro_batch": 16}, "unset micro_batch"),
    ],
)
def test_the_spec_refuses_splits_it_cannot_honour(extra: dict, message: str) -> None:
    with pytest.raises(ValidationError) as err:
        tiny(**extra)
    (error,) = err.value.errors()
    assert error["loc"] == ("backward_splits",) and message in error["msg"]


def test_the_spec_accepts_what_it_can_honour() -> None:
    assert tiny().backward_splits == 1
    assert tiny(backward_splits=32).iters_per_epoch == FORWARDS * 32  # chunks of 1 sample
    assert tiny(backward_splits=2, micro_batch=32).backward_splits == 2  # one pass anyway
    assert tiny(backward_splits=4).baseline().backward_splits == 1  # the plain reference
    with pytest.raises(ValidationError) as err:  # a bad k is reported once, on k
        tiny(workers=0, backward_splits=3)
    assert [e["loc"] for e in err.value.errors()] == [("workers",)]


def test_layer_health_is_measured_per_update() -> None:
    """Dead fractions come from the group's one forward (its first update); norms and
    update ratios from each update's own chunk gradient and step."""
    m = 2
    sink, _ = run(tiny(backward_splits=m, epochs=1, health_every=1, milestones=[]))
    updates = list(range(FORWARDS * m))
    assert sink.steps("health/fc1/g_norm") == updates
    assert sink.steps("health/fc1/update_ratio") == updates
    assert sink.steps("health/fc1/dead") == updates[::m]
    keys = {p[0] for p in sink.points}
    assert "health/fc/dead" not in keys  # no ReLU after the classifier
    assert not [k for k in keys if k.startswith("noise")]
    # The three layers' gradient norms make up the weights' part of the chunk gradient.
    weights = [sink.series(f"health/{n}/g_norm") for n in ("fc1", "fc2", "fc")]
    for u, total in enumerate(sink.series("grad_norm")):
        assert sum(w[u] ** 2 for w in weights) ** 0.5 <= total * (1 + 1e-6)
    assert all(r > 0 for r in sink.series("health/fc2/update_ratio"))


def test_the_api_answers_422_naming_the_field_and_plans_updates(
    sqlite_url: str, tmp_path: Path
) -> None:
    app = create_app(database_url=sqlite_url, broker_url=f"sqla+sqlite:///{tmp_path / 'b.db'}")
    spec = {"model": "mlp", "dataset": "synthetic", "dataset_size": 200, "workers": 4}
    spec |= {"batch_per_worker": 8, "epochs": 2, "milestones": [], "warmup": "none"}
    with TestClient(app) as client:
        r = client.post("/api/plan/run", json={"spec": {**spec, "backward_splits": 3}})
        assert r.status_code == 422
        (item,) = r.json()["detail"]
        assert item["field"] == "backward_splits" and "must divide" in item["message"]
        r = client.post("/api/plan/run", json={"spec": {**spec, "backward_splits": 4}})
        assert r.status_code == 200, r.text
        (planned,) = r.json()["runs"]
        derived = planned["derived"]  # the form's and the CLI's progress count updates
        assert (derived["iters_per_epoch"], derived["total_iters"]) == (FORWARDS * 4, 40)
    app.state.ctx.engine.dispose()


def test_derived_figures_give_the_samples_of_one_update() -> None:
    """The dashboard's samples axis and samples/s multiply steps by ``update_batch``:
    kn/m with backward splits (each logged step is one update of kn/m samples)."""

    spec = RunSpec(workers=4, batch_per_worker=32, backward_splits=4, dataset_size=2048)
    derived = spec.summary_dict()
    assert (derived["total_batch"], derived["update_batch"]) == (128, 32)
    assert RunSpec(workers=4, batch_per_worker=32).summary_dict()["update_batch"] == 128
