"""The trainer's GPU speed paths, checked on the CPU (CUDA probing faked) and, when a GPU
is there, for real (tests marked ``gpu``, run by bench/gpu_check.sh).

On the CPU: the NCCL/gloo choice and each process's GPU, cuDNN/TF32 settings, the data
kept on the device (the ``meta`` device stands in for a GPU), channels_last through
``fit``, bf16, ``torch.compile`` against eager, and no host sync between metric flushes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_fit import run, tiny
from torch import nn

import trainer.models
from trainer import RunConfigError, loop
from trainer import distributed as tdist
from trainer.batches import Batches, Layout, _loader_options
from trainer.data import load_datasets
from trainer.models import uses_channels_last
from trainer.spec import RunSpec

CUDA0, CUDA1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.fixture(autouse=True)
def _isolated_home(batchlab_home: str) -> None:
    """Each test gets its own BATCHLAB_HOME (data cache)."""


@pytest.fixture(autouse=True)
def _restore_backend_flags() -> Iterator[None]:
    matmul, bench = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_float32_matmul_precision(matmul)
    torch.backends.cudnn.benchmark = bench
    torch.set_num_threads(threads)


# --- device, backend, process group (CUDA faked) ---------------------------------------------
@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Two fake GPUs and a fake process group that records how it was initialised."""
    seen: dict[str, Any] = {"set_device": []}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen["set_device"].append(d))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(init=kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    return seen


def test_backend_is_nccl_on_gpus_and_gloo_on_cpus() -> None:
    assert tdist.backend_for(CUDA0) == "nccl"
    assert tdist.backend_for(CPU) == "gloo"


def test_a_torchrun_process_on_cuda_takes_its_local_gpu_with_nccl(fake_cuda: dict) -> None:
    torch.backends.cudnn.benchmark = False
    ctx, device = tdist.init_from_env("cuda")
    assert device == CUDA1 and (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 1)
    assert ctx.owns_group
    init = fake_cuda["init"]
    assert init["backend"] == "nccl" and init["device_id"] == CUDA1
    assert fake_cuda["set_device"] == [CUDA1]
    assert torch.backends.cudnn.benchmark is True
    assert torch.get_float32_matmul_precision() == "high"


def test_auto_picks_cuda_when_there_is_one(fake_cuda: dict) -> None:
    _, device = tdist.init_from_env("auto")
    assert device == CUDA1 and fake_cuda["init"]["backend"] == "nccl"


def test_a_torchrun_process_on_cpu_uses_gloo_and_no_gpu(
    fake_cuda: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.backends.cudnn.benchmark = False
    _, device = tdist.init_from_env("cpu")
    assert device == CPU
    assert fake_cuda["init"]["backend"] == "gloo" and "device_id" not in fake_cuda["init"]
    assert fake_cuda["set_device"] == [] and torch.backends.cudnn.benchmark is False


def test_more_processes_than_gpus_is_refused(
    fake_cuda: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(RunConfigError, match="2 visible, NCCL needs one per process"):
        tdist.init_from_env("cuda")
    assert "init" not in fake_cuda


def test_one_process_on_cuda_sets_up_its_gpu(
    fake_cuda: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx, device = tdist.init_from_env("cuda")
    assert device == CUDA0 and not ctx.distributed and "init" not in fake_cuda
    assert fake_cuda["set_device"] == [CUDA0] and torch.backends.cudnn.benchmark is True


def test_cpu_runs_leave_the_backend_flags_alone() -> None:
    torch.backends.cudnn.benchmark = False
    tdist.configure_device(CPU)
    assert torch.backends.cudnn.benchmark is False
    assert torch.get_float32_matmul_precision() == "highest"


# --- data on the device, channels_last --------------------------------------------------------
def test_channels_last_is_for_2d_conv_models_on_cuda() -> None:
    spec = RunSpec(model="resnet20", dataset="synthetic")
    assert uses_channels_last(spec, CUDA0)
    assert not uses_channels_last(spec, CPU)
    assert not uses_channels_last(RunSpec(), CUDA0)  # mnist1d_cnn: 1-D convolutions
    assert not uses_channels_last(RunSpec(model="mlp", dataset="cifar10", data_root="."), CUDA0)


def test_in_memory_data_moves_to_the_device_once_in_its_layout() -> None:
    """The ``meta`` device stands in for a GPU: everything but the values is real."""
    spec = RunSpec(
        model="simple_cnn", dataset="synthetic", dataset_size=100, workers=2, batch_per_worker=8
    )
    splits = load_datasets(spec)
    layout = Layout.build(spec, len(splits.train), len(splits.val), 0, 1)  # type: ignore[arg-type]
    meta = torch.device("meta")
    data = Batches(splits, layout, 1, meta, channels_last=True)
    assert data.in_memory and data.on_device
    assert data.train.x.device == meta and data.val_data.y.device == meta
    assert data.train.x.is_contiguous(memory_format=torch.channels_last)
    batches = list(data.epoch(0))
    assert len(batches) == layout.iters_per_epoch
    for x, y in [*batches, *data.val(0, 20, 8)]:
        assert x.device == meta and y.device == meta
        assert x.is_contiguous(memory_format=torch.channels_last)
    assert [len(b.y) for b in data.val(0, 20, 8)] == [8, 8, 4]
    # On the CPU nothing moves or changes layout.
    host = Batches(splits, layout, 1, CPU)
    assert not host.on_device and host.train.x is splits.train.tensors[0]  # type: ignore[attr-defined]


def test_loaded_batches_come_through_pinned_memory_on_cuda() -> None:
    assert _loader_options(1, CUDA0)["pin_memory"] is True
    assert _loader_options(1, CPU)["pin_memory"] is False


def conv_spec(**kw: Any) -> RunSpec:
    base: dict[str, Any] = {
        "model": "resnet20",
        "dataset": "synthetic",
        "dataset_size": 80,
        "epochs": 1,
        "workers": 2,
        "batch_per_worker": 8,
        "ref_batch": 16,
        "warmup": "none",
        "decay": "constant",
        "device": "cpu",
        "checkpoint": False,
    }
    return RunSpec(**(base | kw))


@pytest.mark.parametrize("norm", ["bn_local", "frn", "gn"])
def test_channels_last_through_fit_follows_the_contiguous_run(
    norm: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA layout forced on the CPU: model and batches channels_last, same losses."""
    spec = conv_spec(norm=norm)
    plain, _ = run(spec)
    seen: dict[str, Any] = {}
    build = trainer.models.build_model

    def recording_build(spec: RunSpec, num_classes: int = 10) -> nn.Module:
        model = build(spec, num_classes)

        def check_input(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            seen.setdefault("inputs", []).append(
                args[0].is_contiguous(memory_format=torch.channels_last)
            )

        model.register_forward_pre_hook(check_input)
        seen["model"] = model
        return model

    monkeypatch.setattr(trainer.models, "uses_channels_last", lambda spec, device: True)
    monkeypatch.setattr(trainer.models, "build_model", recording_build)
    nhwc, result = run(spec)
    assert result.status == "succeeded" and nhwc.meta["channels_last"] is True
    assert plain.meta["channels_last"] is False
    assert seen["inputs"] and all(seen["inputs"])  # training and validation batches
    convs = [m.weight for m in seen["model"].modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert nhwc.series("loss") == pytest.approx(plain.series("loss"), rel=1e-4)
    assert nhwc.series("val_loss") == pytest.approx(plain.series("val_loss"), rel=1e-4)


# --- precision, compile, meta ------------------------------------------------------------------
def test_bf16_keeps_norms_and_weights_in_fp32(tmp_path: Path) -> None:
    sink, result = run(conv_spec(precision="bf16", checkpoint=True), run_dir=tmp_path)
    assert result.status == "succeeded" and sink.meta["precision"] == "bf16"
    assert all(math.isfinite(v) for v in sink.series("loss"))
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["model"]
    floats = {k: v.dtype for k, v in state.items() if v.is_floating_point()}
    assert floats and set(floats.values()) == {torch.float32}
    assert any("running_mean" in k for k in floats)


def test_meta_names_the_device_and_speed_settings() -> None:
    sink, _ = run(tiny(epochs=1))
    meta = sink.meta
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__
    assert meta["in_memory"] is True and meta["data_on_device"] is False
    assert (meta["precision"], meta["channels_last"], meta["compile"], meta["tf32"]) == (
        "fp32",
        False,
        False,
        False,
    )


@pytest.mark.slow
def test_compiled_run_follows_the_eager_run() -> None:
    """torch.compile (inductor, CPU code) gives the eager loss trajectory up to rounding;
    checkpoints keep the plain module's parameter names."""
    spec = tiny(epochs=1, warmup="none")
    eager, _ = run(spec)
    compiled, result = run(spec.model_copy(update={"compile": True}))
    assert result.status == "succeeded" and compiled.meta["compile"] is True
    assert compiled.series("loss") == pytest.approx(eager.series("loss"), rel=1e-5)
    assert compiled.series("val_loss") == pytest.approx(eager.series("val_loss"), rel=1e-5)


# --- no host sync between flushes ------------------------------------------------------------
SYNCING = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@pytest.mark.parametrize(
    "extra",
    [{}, {"micro_batch": 8, "precision": "bf16"}, {"norm": "bn_ghost", "ghost_batch": 4}],
)
def test_the_hot_loop_never_waits_for_the_device(
    extra: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every way a tensor's value reaches Python is counted while iterations run, except
    inside metric flushes and epoch ends (which sync on purpose). On CUDA a sync there
    would stall the GPU's queue each iteration."""
    hot = {"on": False, "calls": []}

    def counting(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, **kw: Any) -> Any:
            if hot["on"]:
                hot["calls"].append(name)
            return original(self, *args, **kw)

        return wrapper

    def cold(method: Any) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            was, hot["on"] = hot["on"], False
            try:
                return method(*args, **kw)
            finally:
                hot["on"] = was

        return wrapper

    def hot_epoch(self: Any, epoch: int) -> bool:
        hot["on"] = True
        try:
            return train_epoch(self, epoch)
        finally:
            hot["on"] = False

    flushes: list[int] = []
    flush = cold(loop._Run._flush)

    def counted_flush(self: Any, **kw: Any) -> bool:
        flushes.append(1)
        return flush(self, **kw)

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    train_epoch = loop._Run._train_epoch
    monkeypatch.setattr(loop._Run, "_train_epoch", hot_epoch)
    monkeypatch.setattr(loop._Run, "_flush", counted_flush)
    monkeypatch.setattr(loop._Run, "_end_epoch", cold(loop._Run._end_epoch))
    spec = tiny(dataset_size=1000, epochs=2, **extra)  # 25 iterations per epoch
    sink, result = run(spec)
    assert result.status == "succeeded" and len(sink.series("loss")) == 50
    assert hot["calls"] == []
    assert len(flushes) < 50  # the buffer batches iterations between syncs


# --- on a real GPU (bench/gpu_check.sh) ------------------------------------------------------
@pytest.mark.gpu
def test_a_gpu_run_keeps_data_on_the_device_without_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet20 in bf16 on cuda: channels_last, data on the GPU, and CUDA's own sync
    detector raising on any synchronising call inside the iterations of the second epoch
    (the first autotunes cuDNN)."""
    spec = conv_spec(device="cuda", precision="bf16", dataset_size=400, epochs=2)
    train_epoch, flush = loop._Run._train_epoch, loop._Run._flush
    end_epoch = loop._Run._end_epoch

    def strict(method: Any, mode: str) -> Any:
        def wrapper(*args: Any, **kw: Any) -> Any:
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(mode)
            try:
                return method(*args, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(previous)

        return wrapper

    def second_epoch_strict(self: Any, epoch: int) -> bool:
        method = strict(train_epoch, "error") if epoch > 0 else train_epoch
        return method(self, epoch)

    monkeypatch.setattr(loop._Run, "_train_epoch", second_epoch_strict)
    monkeypatch.setattr(loop._Run, "_flush", strict(flush, "default"))
    monkeypatch.setattr(loop._Run, "_end_epoch", strict(end_epoch, "default"))
    sink, result = run(spec)
    assert result.status == "succeeded", result.error
    meta = sink.meta
    assert meta["device"] == "cuda:0" and meta["channels_last"] is True
    assert meta["in_memory"] is True and meta["data_on_device"] is True and meta["tf32"] is True
    assert all(math.isfinite(v) for v in sink.series("loss"))
