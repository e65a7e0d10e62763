"""How a run cuts its data into iterations (:class:`Layout`) and the batches that follow it.

The epoch's shuffle is one permutation seeded by (seed, epoch), identical in every process
(Remark 4); iteration i takes its next kn indices, worker j the j-th block of n. Process p
holds workers [p k/P, (p+1) k/P), i.e. kn/P consecutive indices, forwarded in chunks.

In-memory ``TensorDataset``s (every dataset that fits) are indexed directly with the
permutation, no DataLoader; lazy datasets (large synthetic shapes, image folders) go
through a DataLoader with worker processes whose batch sampler yields the same indices.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Subset, TensorDataset

from trainer.data import Splits
from trainer.spec import RunSpec

__all__ = ["Batch", "Batches", "Chunk", "Layout", "epoch_permutation", "micro_batch_size"]

# In-memory datasets (train + validation) up to this size move to the GPU once; bigger ones
# stay in host memory and each iteration's batch is copied.
DEVICE_DATA_LIMIT_BYTES = 2 << 30


class Chunk(NamedTuple):
    """Samples [start, stop) of a process's batch, forwarded together."""

    start: int
    stop: int


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The epoch's shuffle of ``range(size)``: a pure function of (seed, epoch).

    ``seed * 1_000_003 + epoch`` never collides for epoch < 1_000_003 (RunSpec allows
    10_000), so every (seed, epoch) pair gets its own generator seed.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=gen)


def micro_batch_size(process_batch: int, n: int, micro_batch: int | None) -> int:
    """Samples per forward pass: whole workers (multiples of n), or a divisor of n (which
    RunSpec checks)."""
    if micro_batch is None or micro_batch >= process_batch:
        return process_batch
    return (micro_batch // n) * n if micro_batch >= n else micro_batch


@dataclass(frozen=True)
class Layout:
    """Iterations, epochs and this process's share of each iteration's kn samples.

    An iteration is one update. With ``backward_splits`` m > 1 (seed 004,
    trainer/splits.py) one forward pass over kn samples serves m iterations, each on
    ``update_batch`` = kn/m of them: ``iters_per_epoch`` counts updates (what the LR
    schedule, metrics and checkpoints count), ``forwards_per_epoch`` the kn batches.
    """

    seed: int
    train_size: int
    val_size: int
    total_batch: int  # kn
    iters_per_epoch: int
    epochs: int
    process_batch: int  # kn / P
    offset: int  # where this process's samples start in each iteration's kn
    chunks: tuple[Chunk, ...]
    backward_splits: int = 1

    @classmethod
    def build(
        cls, spec: RunSpec, train_size: int, val_size: int, rank: int, world_size: int
    ) -> Layout:
        kn = spec.total_batch  # RunSpec and load_datasets made sure kn <= train_size
        pb = kn // world_size
        size = micro_batch_size(pb, spec.batch_per_worker, spec.micro_batch)
        return cls(
            seed=spec.seed,
            train_size=train_size,
            val_size=val_size,
            total_batch=kn,
            # the last partial minibatch is dropped; each kn batch makes m updates
            iters_per_epoch=(train_size // kn) * spec.backward_splits,
            epochs=spec.epochs,
            process_batch=pb,
            offset=rank * pb,
            chunks=tuple(Chunk(a, min(a + size, pb)) for a in range(0, pb, size)),
            backward_splits=spec.backward_splits,
        )

    @property
    def total_iters(self) -> int:
        return self.epochs * self.iters_per_epoch

    @property
    def forwards_per_epoch(self) -> int:
        """kn batches per epoch (forward passes; each makes ``backward_splits`` updates)."""
        return self.iters_per_epoch // self.backward_splits

    @property
    def update_batch(self) -> int:
        """Samples behind one update: kn / backward_splits."""
        return self.total_batch // self.backward_splits

    @property
    def micro_batch(self) -> int:
        return self.chunks[0].stop - self.chunks[0].start

    @property
    def samples_dropped_per_epoch(self) -> int:
        return self.train_size - self.forwards_per_epoch * self.total_batch

    def indices(self, epoch: int, device: torch.device | None = None) -> Iterator[torch.Tensor]:
        """This process's sample indices of each kn batch of ``epoch``, on ``device`` (moved
        once an epoch, asynchronously from pinned memory on CUDA: a copy from pageable
        memory would wait for the GPU's queue to drain)."""
        perm = epoch_permutation(self.seed, epoch, self.train_size)
        if device is not None and device.type == "cuda":
            perm = perm.pin_memory().to(device, non_blocking=True)
        else:
            perm = perm.to(device)
        for i in range(self.forwards_per_epoch):
            lo = i * self.total_batch + self.offset
            yield perm[lo : lo + self.process_batch]


class Batches:
    """This process's training batches of each epoch and its share of validation, on the
    device: indexed tensors when the data is in memory, a DataLoader otherwise.

    On a GPU, in-memory data (up to ``DEVICE_DATA_LIMIT_BYTES``) is copied there once, so
    an iteration is one gather on the device and no host-to-device copy; loaded batches
    come through pinned memory with asynchronous copies. ``channels_last`` stores image
    batches NHWC, the layout of a channels_last model.
    """

    def __init__(
        self,
        splits: Splits,
        layout: Layout,
        world_size: int,
        device: torch.device,
        *,
        channels_last: bool = False,
    ) -> None:
        self.splits, self.layout, self.device = splits, layout, device
        self.channels_last = channels_last
        self.options = _loader_options(world_size, device)
        self.in_memory = all(isinstance(s, TensorDataset) for s in (splits.train, splits.val))
        self.on_device = False
        if self.in_memory:
            train = tuple(splits.train.tensors[:2])  # type: ignore[attr-defined]
            val = tuple(splits.val.tensors[:2])  # type: ignore[attr-defined]
            size = sum(t.numel() * t.element_size() for t in (*train, *val))
            self.on_device = device.type != "cpu" and size <= DEVICE_DATA_LIMIT_BYTES
            if self.on_device:
                train, val = self._to_device(*train), self._to_device(*val)
            self.train, self.val_data = Batch(*train), Batch(*val)

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        """(x, y) on the device; ``to`` returns tensors already there (and in the layout)
        as they are. Copies are asynchronous from pinned memory (the DataLoader's)."""
        fmt = torch.channels_last if self.channels_last and x.dim() == 4 else None
        x = x.to(self.device, non_blocking=True, memory_format=fmt or torch.preserve_format)
        return Batch(x, y.to(self.device, non_blocking=True))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        if self.in_memory:
            x, y = self.train
            for idx in self.layout.indices(epoch, x.device):
                yield self._to_device(x[idx], y[idx])
        else:
            sampler = (idx.tolist() for idx in self.layout.indices(epoch))
            loader = DataLoader(self.splits.train, batch_sampler=sampler, **self.options)
            for xb, yb in loader:
                yield self._to_device(xb, yb)

    def val(self, lo: int, hi: int, batch_size: int) -> Iterator[Batch]:
        """Validation samples [lo, hi) in batches of ``batch_size``."""
        if self.in_memory:
            x, y = self.val_data
            for a in range(lo, hi, batch_size):
                b = min(a + batch_size, hi)
                yield self._to_device(x[a:b], y[a:b])
        else:
            subset = Subset(self.splits.val, range(lo, hi))
            for xb, yb in DataLoader(subset, batch_size=batch_size, **self.options):
                yield self._to_device(xb, yb)


def _loader_options(world_size: int, device: torch.device) -> dict[str, Any]:
    """DataLoader settings for lazy datasets: the host's cores shared by the processes.

    Workers are started per epoch (not persistent), so none outlive a run.
    """
    workers = max(1, min(8, (os.cpu_count() or 2) // world_size - 1))
    return {"num_workers": workers, "pin_memory": device.type == "cuda"}
