"""Real workers: torch.distributed through torchrun (gloo on CPU, NCCL on CUDA).

``trainer.fit`` calls :func:`init_from_env`: outside torchrun (``WORLD_SIZE`` unset or 1)
it returns a one-process context and touches nothing; inside, it initialises the default
process group itself. Each of the P processes holds k/P consecutive virtual workers.

DDP averages gradients over processes by default. The loop normalises every process's
loss by the *global* k*n (Goyal et al. Remark 3), so the all-reduce must *sum*:
:func:`sum_allreduce_hook` is registered on every DDP model.

Buffers (BN running statistics) are not broadcast before each forward, as DDP does by
default (they would follow rank 0's workers only): each process updates its own from its
workers, and :func:`average_buffers_` averages them before evaluation and checkpoints. The
running update is linear in the batch statistics, so the average equals the statistics of
the virtual run, which takes the mean over all k workers' statistics in one pass.

Several nodes (``spec.nodes``): torchrun's agents on N machines rendezvous, and the
P = nodes x nproc processes form one group. Every collective waits at most
``BATCHLAB_COLLECTIVE_TIMEOUT_S`` for its peers, so a lost node fails the others instead
of leaving them blocked for ever.
"""

# No ``from __future__ import annotations`` here: DDP checks the comm hook's annotations
# against the real classes, which postponed (string) annotations would fail.
import os
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from core.settings import get_settings
from trainer import RunConfigError

__all__ = [
    "DistContext",
    "all_reduce_sum_",
    "average_buffers_",
    "backend_for",
    "configure_device",
    "finish",
    "init_from_env",
    "resolve_device",
    "shutdown",
    "sum_allreduce_hook",
    "wrap_ddp",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: its rank among ``world_size`` training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we initialised the process group, so we destroy it
    nodes: int = 1  # machines the processes run on (torchrun's agents)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def node_local_main(self) -> bool:
        """The first process of its node: it writes the node's own run folder."""
        return self.local_rank == 0


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> CUDA when available; each process of a CUDA run gets its local GPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RunConfigError("device: 'cuda' requested but torch.cuda.is_available() is False")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def configure_device(device: torch.device) -> None:
    """Process-wide CUDA settings a training process wants (nothing on the CPU).

    cuDNN autotuning picks the fastest convolution algorithms for the (fixed) batch
    shapes; TF32 lets fp32 matmuls use tensor cores (cuDNN convolutions already do by
    default): fp32 accumulation, ~10 mantissa bits in the products, PyTorch's advice for
    training (docs/runspec.md, ``precision``).
    """
    if device.type != "cuda":
        return
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")


def init_from_env(requested_device: str) -> tuple[DistContext, torch.device]:
    """The process's context and device; initialises the process group under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:  # not a torchrun launch of several
        device = resolve_device(requested_device)
        configure_device(device)
        return DistContext(), device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if device.type == "cuda" and local_rank >= torch.cuda.device_count():
        raise RunConfigError(
            f"process {local_rank} of this host has no GPU of its own: "
            f"{torch.cuda.device_count()} visible, NCCL needs one per process (nproc)"
        )
    configure_device(device)
    owns = False
    if not dist.is_initialized():
        # device_id binds the NCCL communicator to this process's GPU at once (no guess
        # from the current device, no extra context on GPU 0).
        extra = {"device_id": device} if device.type == "cuda" else {}
        # A bounded wait: when a peer (a whole node) dies, the others fail after this
        # long instead of hanging in their next collective.
        timeout = timedelta(seconds=get_settings().collective_timeout_s)
        dist.init_process_group(backend=backend_for(device), timeout=timeout, **extra)
        owns = True
    world_size = dist.get_world_size()
    ctx = DistContext(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        owns_group=owns,
        nodes=_nodes(world_size),
    )
    return ctx, device


def _nodes(world_size: int) -> int:
    """How many nodes torchrun started: its agents (GROUP_WORLD_SIZE), else the world over
    the processes of one node (a launch that sets only the per-process variables)."""
    if os.environ.get("GROUP_WORLD_SIZE"):
        return int(os.environ["GROUP_WORLD_SIZE"])
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    return max(1, world_size // max(per_node, 1))


def finish(ctx: DistContext) -> None:
    """After a run that ended normally on every rank: wait for all of them.

    Tearing the group down while a peer still uses its connections (rank 0 writing the
    last checkpoint, say) can abort the peer's gloo threads. Not called after an error:
    the other ranks may be blocked in another collective and this would hang.
    """
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def shutdown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def exit_worker_process(code: int) -> NoReturn:
    """End a torchrun-launched process without interpreter finalization.

    Even after destroy_process_group, gloo's C++ threads can still hold work objects whose
    tensors need the GIL when freed; during finalization that aborts the process
    ("terminate called without an active exception", SIGABRT), turning a finished run
    into a failed launch (seen about once in 20 runs here; see pytorch/pytorch#179291).
    Everything of the run is written and closed by now, so flush and leave.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def sum_allreduce_hook(
    process_group: dist.ProcessGroup | None, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: all-reduce a gradient bucket by SUM (not DDP's mean)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap_ddp(model: nn.Module, ctx: DistContext, device: torch.device) -> DDP:
    """DDP over ``model`` with summed gradients and per-process buffers."""
    ids = [device.index] if device.type == "cuda" else None
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, whose False
        # still syncs buffers at construction; its own advice is to keep
        # broadcast_buffers=False (rank-local BN statistics) until init_sync_buffers
        # exists. Said once per process in every run's log otherwise.
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        ddp = DDP(model, device_ids=ids, broadcast_buffers=False)
    ddp.register_comm_hook(None, sum_allreduce_hook)
    return ddp


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over the processes in place (no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def average_buffers_(model: nn.Module, ctx: DistContext) -> None:
    """Replace every floating-point buffer by its mean over the processes (once an epoch)."""
    for buf in model.buffers() if ctx.distributed else ():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(ctx.world_size)
