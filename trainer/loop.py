"""``fit``: the large-minibatch training loop of Goyal et al. 2017, made exact.

One iteration, for k workers of n samples (total kn) over P processes:

1. The LR comes from the pure schedule ``trainer.schedule.lr_at`` (warmup, decay).
2. The epoch's shuffle is one permutation seeded by (seed, epoch), identical in every
   process (Remark 4); iteration i takes its next kn indices, worker j the j-th block of
   n. Process p holds workers [p k/P, (p+1) k/P), i.e. kn/P consecutive indices.
3. A process's workers go through ONE forward pass; per-worker BN (``bn_local``) is
   grouped BN with groups of n, which equals k separate BNs. Each micro-batch's loss is
   sum(cross-entropy) / kn (Remark 3), so gradients accumulate over micro-batches and sum
   over processes (DDP with a summing hook) into the gradient of the mean over kn.
4. The optimizer steps (trainer/optim.py); metrics are buffered on the device and brought
   to the host about once a second (one synchronisation), where divergence is checked,
   ``should_stop`` is polled and the sink receives the points.

Micro-batches: ``spec.micro_batch`` smaller than a process's kn/P splits the forward into
chunks that are whole multiples of n (so BN groups stay whole workers); below n it must
divide n, and the BN groups of ``bn_local``/``cbn`` become the micro-batch (a worker's
statistics are then taken per micro-batch), those of ``bn_ghost`` gcd(ghost_batch,
micro_batch), and ``bn_sync`` normalises over each micro-batch (of every process).

Data: in-memory ``TensorDataset``s (every dataset that fits) are indexed directly with
the permutation, no DataLoader; lazy datasets (large synthetic shapes, image folders) go
through a DataLoader with worker processes whose batch sampler yields the same indices.

Timing: ``data_time`` is the time spent shuffling and fetching batches (indexing the
in-memory tensors, or waiting for the DataLoader), ``compute_time`` the rest of the
epoch's training time (forward, backward, step, metric flushes); ``epoch_time`` is their
sum, validation and checkpoints excluded. On CUDA, kernels run asynchronously: single
``step_time`` values are smoothed over a flush window, whose sum is exact (each flush
synchronises).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from trainer import RunConfigError
from trainer import checkpoint as ckpt
from trainer import distributed as tdist
from trainer.metrics import EvalPoint, SummaryTracker
from trainer.optim import build_optimizer, set_lr
from trainer.schedule import lr_at, warmup_iters
from trainer.sink import MetricSink, NullSink
from trainer.spec import RunSpec

__all__ = ["FitResult", "epoch_permutation", "fit", "micro_batch_size", "norm_group_size"]

# Datasets up to this size move to the GPU once; bigger ones stay in host memory and each
# iteration's batch is copied.
DEVICE_DATA_LIMIT_BYTES = 2 << 30
# Metric flushes aim at four per second (one host sync each, so live curves lag by at most
# this much); never fewer samples of the loss than this many iterations apart (bounds how
# far a diverged run overshoots before it is stopped). should_stop is asked once a second.
MAX_FLUSH_EVERY = 200
FLUSH_INTERVAL_S = 0.25
POLL_INTERVAL_S = 1.0


@dataclass
class FitResult:
    """How a ``fit`` call ended."""

    status: str  # succeeded | diverged | cancelled
    iterations: int  # iterations completed (a diverged run's count includes its last)
    epochs: float  # iterations / iters_per_epoch
    diverged_step: int | None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def epoch_permutation(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The epoch's shuffle of ``range(size)``: a pure function of (seed, epoch).

    ``seed * 1_000_003 + epoch`` never collides for epoch < 1_000_003 (RunSpec allows
    10_000), so every (seed, epoch) pair gets its own generator seed.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=gen)


def micro_batch_size(process_batch: int, n: int, micro_batch: int | None) -> int:
    """Samples per forward pass: whole workers (multiples of n), or a divisor of n."""
    if micro_batch is None or micro_batch >= process_batch:
        return process_batch
    if micro_batch >= n:
        return (micro_batch // n) * n
    if n % micro_batch:
        raise RunConfigError(
            f"micro_batch: {micro_batch} must divide batch_per_worker={n} or exceed it"
        )
    return micro_batch


def norm_group_size(spec: RunSpec, chunk: int) -> int | None:
    """BN statistics group size for forwards of ``chunk`` samples (None: whole batch)."""
    n = spec.batch_per_worker
    if spec.norm in ("bn_local", "cbn"):
        return n if chunk >= n else chunk
    if spec.norm == "bn_ghost":
        g = spec.ghost_batch or n
        return g if chunk % g == 0 else math.gcd(g, chunk)
    return None


def fit(
    spec: RunSpec,
    sink: MetricSink,
    *,
    run_dir: str | Path | None = None,
    resume: bool = True,
    should_stop: Callable[[], bool] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train ``spec``, streaming metrics to ``sink`` (closed at the end, also on errors).

    Inside torchrun (WORLD_SIZE > 1) every process calls ``fit``; the process group is
    initialised here, only rank 0 writes to the sink and the checkpoint. ``run_dir``
    holds ``checkpoint.pt`` (written at each epoch end when ``spec.checkpoint``; resumed
    from when ``resume``). ``should_stop`` is polled about once a second and at each
    epoch end; True ends the run as cancelled (the last checkpoint is kept).
    """
    ctx: tdist.DistContext | None = None
    run: _Run | None = None
    try:
        ctx, device = tdist.init_from_env(spec.device)
        if ctx.distributed and ctx.world_size != spec.nproc:
            raise RunConfigError(
                f"nproc: the spec asks for {spec.nproc} processes, torchrun started "
                f"{ctx.world_size}"
            )
        if not ctx.distributed and spec.nproc > 1:
            warnings.warn(
                f"nproc={spec.nproc} but not launched by torchrun: the {spec.workers} "
                "workers run as virtual workers in one process (same updates)",
                stacklevel=2,
            )
        run = _Run(
            spec,
            sink if ctx.is_main else NullSink(),
            ctx,
            device,
            Path(run_dir) if run_dir is not None else None,
            should_stop if ctx.is_main else None,
            progress and ctx.is_main,
        )
        result = run.run(resume)
        tdist.finish(ctx)
        return result
    finally:
        if run is not None:
            run.release()  # DDP's reducer goes before the process group it uses
        sink.close()
        if ctx is not None:
            tdist.shutdown(ctx)


class _Diverged(Exception):
    def __init__(self, step: int, message: str) -> None:
        super().__init__(message)
        self.step = step


class _Run:
    """One call of ``fit``: setup, the epoch loop, metric flushes, checkpoints."""

    def __init__(
        self,
        spec: RunSpec,
        sink: MetricSink,
        ctx: tdist.DistContext,
        device: torch.device,
        run_dir: Path | None,
        should_stop: Callable[[], bool] | None,
        progress: bool,
    ) -> None:
        self.spec, self.sink, self.ctx, self.device = spec, sink, ctx, device
        self.run_dir, self.should_stop, self.progress = run_dir, should_stop, progress

    # --- setup ---------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        from trainer.data import load_datasets
        from trainer.models import build_model
        from trainer.norms import set_group_size

        spec, ctx, device = self.spec, self.ctx, self.device
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        splits = load_datasets(spec)
        self.train_set, self.val_set = splits.train, splits.val
        self.train_size, self.val_size = len(splits.train), len(splits.val)  # type: ignore[arg-type]
        self.kn = spec.total_batch
        if self.kn > self.train_size:
            raise RunConfigError(
                f"batch_per_worker: total batch {self.kn} is larger than the training set "
                f"({self.train_size} samples)"
            )
        self.ipe = self.train_size // self.kn  # the last partial minibatch is dropped
        self.total_iters = spec.epochs * self.ipe
        self.process_batch = self.kn // ctx.world_size
        self.offset = ctx.rank * self.process_batch
        self.in_memory = isinstance(splits.train, TensorDataset) and isinstance(
            splits.val, TensorDataset
        )
        if self.in_memory:
            self.train_x, self.train_y = (self._place(t) for t in splits.train.tensors[:2])
            self.val_x, self.val_y = splits.val.tensors[:2]
        else:
            self.sampler = _EpochBatchSampler(self)
            self.loader = DataLoader(
                splits.train,
                batch_sampler=self.sampler,
                **_loader_options(ctx.world_size, device),
            )

        self.model = build_model(spec, num_classes=splits.num_classes).to(device)
        chunk = micro_batch_size(self.process_batch, spec.batch_per_worker, spec.micro_batch)
        self.chunks = [
            (a, min(a + chunk, self.process_batch)) for a in range(0, self.process_batch, chunk)
        ]
        if spec.norm in ("bn_local", "bn_ghost", "bn_sync", "cbn"):
            set_group_size(self.model, norm_group_size(spec, chunk))
        self.optimizer = build_optimizer(self.model, spec)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.start_epoch, self.wall_offset = 0, 0.0
        self.tracker = SummaryTracker(
            total_iters=self.total_iters,
            total_batch=self.kn,
            peak_lr=spec.peak_lr,
            target_accuracy=spec.target_accuracy,
        )
        self.ckpt_path = self.run_dir / ckpt.CHECKPOINT_NAME if self.run_dir else None
        state = ckpt.load_checkpoint(self.ckpt_path) if resume and self.ckpt_path else None
        if state is not None:
            ckpt.check_compatible(state["spec"], spec, self.ckpt_path)
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch = int(state["epoch"])
            self.wall_offset = float(state["wall_time"])
            self.tracker = SummaryTracker.from_state_dict(state["tracker"])
            self.tracker.target_accuracy = spec.target_accuracy
            if ctx.rank < len(state["rng"]):
                ckpt.set_rng_state(state["rng"][ctx.rank])
        self.resumed = state is not None
        # DDP after loading: it broadcasts rank 0's parameters and buffers at construction.
        self.ddp = tdist.wrap_ddp(self.model, ctx, device) if ctx.distributed else None
        self.net: nn.Module = self.ddp if self.ddp is not None else self.model
        self.setup_s = time.perf_counter() - t0

    def release(self) -> None:
        """Drop the DDP wrapper and the data loader now, not whenever GC gets to them."""
        for name in ("ddp", "net", "loader"):
            self.__dict__.pop(name, None)

    def _place(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu" or t.numel() * t.element_size() > DEVICE_DATA_LIMIT_BYTES:
            return t
        return t.to(self.device)

    def _meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "iters_per_epoch": self.ipe,
            "total_iters": self.total_iters,
            "total_batch": self.kn,
            "peak_lr": self.spec.peak_lr,
            "warmup_iters": warmup_iters(self.spec, self.ipe),
            "device": str(self.device),
            "nproc": self.ctx.world_size,
            "params": sum(p.numel() for p in self.params),
            "train_size": self.train_size,
            "val_size": self.val_size,
            "in_memory": self.in_memory,
            "micro_batch": self.chunks[0][1] - self.chunks[0][0],
            "start_step": self.start_epoch * self.ipe,
            "resumed": self.resumed,
            "setup_s": self.setup_s,
            "torch": torch.__version__,
        }
        if self.device.type == "cuda":
            meta["device_name"] = torch.cuda.get_device_name(self.device)
        return meta

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.spec.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # --- the run -------------------------------------------------------------------------
    def run(self, resume: bool) -> FitResult:
        self._setup(resume)
        self.sink.start(self._meta())
        self.pbar = None
        if self.progress:
            from tqdm import tqdm

            self.pbar = tqdm(
                total=self.total_iters,
                initial=self.start_epoch * self.ipe,
                unit="it",
                dynamic_ncols=True,
            )
        self.t_start = time.perf_counter()
        self.last_poll = -math.inf  # the first flush polls: a cancel is seen at once
        self.flush_every = 1
        self.pending_t: list[torch.Tensor] = []
        self.pending_meta: list[tuple[int, float, float, float]] = []
        status, diverged_step, error = "succeeded", None, None
        try:
            for epoch in range(self.start_epoch, self.spec.epochs):
                stop = self._train_epoch(epoch)
                if stop and epoch + 1 < self.spec.epochs:
                    status = "cancelled"
                    break
        except _Diverged as exc:
            status, diverged_step, error = "diverged", exc.step, str(exc)
        finally:
            if self.pbar is not None:
                self.pbar.close()
        if status != "succeeded" or self.start_epoch >= self.spec.epochs:
            self.tracker.wall_time = max(self.tracker.wall_time, self._wall())
        return FitResult(
            status=status,
            iterations=self.tracker.iterations,
            epochs=self.tracker.iterations / self.ipe,
            diverged_step=diverged_step,
            summary=self.tracker.summary(),
            error=error,
        )

    def _wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t_start

    def _train_epoch(self, epoch: int) -> bool:
        """Train one epoch; True when a stop was requested (cancel after this epoch)."""
        spec, ipe = self.spec, self.ipe
        t_epoch = time.perf_counter()
        batches = self._batches(epoch)
        data_time = 0.0
        self.epoch_loss, self.epoch_err = 0.0, 0.0
        t_prev = t_epoch
        stop = False
        for i in range(ipe):
            it = epoch * ipe + i
            lr = lr_at(spec, it, ipe)
            set_lr(self.optimizer, lr)
            t0 = time.perf_counter()
            x, y = next(batches)
            t1 = time.perf_counter()
            loss, wrong = self._forward_backward(x, y)
            norms = torch._foreach_norm([p.grad for p in self.params if p.grad is not None])
            grad_norm = torch.linalg.vector_norm(torch.stack(norms))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            t_end = time.perf_counter()
            data_time += t1 - t0
            self.pending_t += (loss, wrong, grad_norm)
            self.pending_meta.append((it, lr, t_end - t_prev, t_end))
            t_prev = t_end
            last = i == ipe - 1
            if last or len(self.pending_meta) >= self.flush_every:
                stop = self._flush(force_poll=last)
                if stop and not last:
                    batches.close()
                    return True
        batches.close()
        epoch_time = time.perf_counter() - t_epoch
        self._end_epoch(epoch, epoch_time, data_time)
        return stop

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This process's (x, y) for each iteration of ``epoch``, on the device."""
        dev = self.device
        if self.in_memory:
            perm = epoch_permutation(self.spec.seed, epoch, self.train_size)
            perm = perm.to(self.train_x.device)
            for i in range(self.ipe):
                lo = i * self.kn + self.offset
                idx = perm[lo : lo + self.process_batch]
                x, y = self.train_x[idx], self.train_y[idx]
                if x.device != dev:
                    x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
                yield x, y
        else:
            self.sampler.epoch = epoch
            for x, y in self.loader:
                yield x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)

    def _forward_backward(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of sum(CE)/kn over the micro-batches (Remark 3)."""
        loss_sum: torch.Tensor | None = None
        wrong_sum: torch.Tensor | None = None
        last = len(self.chunks) - 1
        for j, (a, b) in enumerate(self.chunks):
            xb, yb = (x, y) if last == 0 else (x[a:b], y[a:b])
            # DDP all-reduces once per iteration, on the last micro-batch's backward.
            sync = self.ddp.no_sync() if self.ddp is not None and j < last else nullcontext()
            with sync:
                with self._autocast():
                    out = self.net(xb)
                loss = F.cross_entropy(out.float(), yb, reduction="sum") / self.kn
                loss.backward()
            loss = loss.detach()
            wrong = (out.detach().argmax(1) != yb).sum().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
            wrong_sum = wrong if wrong_sum is None else wrong_sum + wrong
        assert loss_sum is not None and wrong_sum is not None
        return loss_sum, wrong_sum

    # --- metrics -------------------------------------------------------------------------
    def _flush(self, force_poll: bool) -> bool:
        """Bring pending figures to the host (one sync), log them, check divergence.

        Returns whether a stop was requested. In DDP the loss and error columns are
        summed over processes in one all-reduce that also carries rank 0's stop flag and
        next flush interval, so every process takes the same decisions.
        """
        rows = len(self.pending_meta)
        values = torch.stack(self.pending_t).view(rows, 3)
        self.pending_t = []
        now = time.perf_counter()
        stop = 0.0
        if self.should_stop is not None and (force_poll or now - self.last_poll >= POLL_INTERVAL_S):
            self.last_poll = now
            stop = float(bool(self.should_stop()))
        mean_step = sum(m[2] for m in self.pending_meta) / rows
        every = float(min(MAX_FLUSH_EVERY, max(1, int(FLUSH_INTERVAL_S / max(mean_step, 1e-9)))))
        if self.ctx.distributed:
            control = torch.tensor(
                [stop, every] if self.ctx.is_main else [0.0, 0.0], device=values.device
            )
            packed = torch.cat([values[:, :2].reshape(-1), control])
            tdist.all_reduce_sum_(packed, self.ctx)
            host = packed.tolist()
            stop, every = host[-2], host[-1]
            norms = values[:, 2].tolist()
            figures = [(host[2 * r], host[2 * r + 1], norms[r]) for r in range(rows)]
        else:
            figures = [tuple(row) for row in values.tolist()]
        self.flush_every = int(every)
        meta, self.pending_meta = self.pending_meta, []
        self._log_iterations(meta, figures)
        return stop > 0

    def _log_iterations(
        self, meta: list[tuple[int, float, float, float]], figures: list[tuple[float, ...]]
    ) -> None:
        kn, ipe, factor = self.kn, self.ipe, self.spec.divergence_factor
        for (it, lr, step_time, t_end), (loss, wrong, grad_norm) in zip(meta, figures, strict=True):
            err = wrong / kn
            self.sink.log(
                it,
                {
                    "loss": loss,
                    "train_err": err,
                    "lr": lr,
                    "samples": float((it + 1) * kn),
                    "grad_norm": grad_norm,
                    "step_time": step_time,
                },
                epoch=(it + 1) / ipe,
                wall_time=self.wall_offset + t_end - self.t_start,
            )
            self.tracker.add_iteration(it, loss, step_time)
            self.epoch_loss += loss
            self.epoch_err += err
            first = self.tracker.first_loss
            if not math.isfinite(loss) or (first is not None and loss > factor * first):
                self.tracker.wall_time = self._wall()
                raise _Diverged(
                    it,
                    f"loss {loss:.4g} at step {it} (first loss {first:.4g}, "
                    f"divergence_factor {factor:g})",
                )
        if self.pbar is not None:
            self.pbar.update(len(meta))
            self.pbar.set_postfix(
                loss=f"{figures[-1][0]:.4f}", lr=f"{meta[-1][1]:.4g}", refresh=False
            )

    def _end_epoch(self, epoch: int, epoch_time: float, data_time: float) -> None:
        spec, ipe = self.spec, self.ipe
        last_it = (epoch + 1) * ipe - 1
        train_loss, train_err = self.epoch_loss / ipe, self.epoch_err / ipe
        values = {
            "epoch_time": epoch_time,
            "data_time": data_time,
            "compute_time": epoch_time - data_time,
            "train_loss_epoch": train_loss,
            "train_err_epoch": train_err,
        }
        evaluated = None
        if (epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs:
            evaluated = self._evaluate()
            if evaluated is not None:
                values["val_loss"], values["val_err"] = evaluated
        wall = self._wall()
        self.sink.log(last_it, values, epoch=float(epoch + 1), wall_time=wall)
        self.tracker.add_epoch(train_err)
        if evaluated is not None:
            self.tracker.add_eval(
                EvalPoint(
                    iterations=last_it + 1,
                    epoch=epoch + 1,
                    wall_time=wall,
                    val_err=evaluated[1],
                    val_loss=evaluated[0],
                )
            )
        self.tracker.wall_time = wall
        if self.ckpt_path is not None and spec.checkpoint:
            self._save_checkpoint(epoch + 1, wall)

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float] | None:
        """(val_loss, val_err) of the whole validation set, split over the processes."""
        size = self.val_size
        if size == 0:
            return None
        model, ctx = self.model, self.ctx
        model.eval()
        lo, hi = size * ctx.rank // ctx.world_size, size * (ctx.rank + 1) // ctx.world_size
        bs = max(self.chunks[0][1] - self.chunks[0][0], 256)
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for xb, yb in self._val_batches(lo, hi, bs):
            xb = xb.to(self.device, non_blocking=True)
            yb = yb.to(self.device, non_blocking=True)
            with self._autocast():
                out = model(xb)
            totals[0] += F.cross_entropy(out.float(), yb, reduction="sum").double()
            totals[1] += (out.argmax(1) != yb).sum()
        tdist.all_reduce_sum_(totals, ctx)
        model.train()
        loss_sum, wrong = totals.tolist()
        return loss_sum / size, wrong / size

    def _val_batches(
        self, lo: int, hi: int, bs: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.in_memory:
            for a in range(lo, hi, bs):
                yield self.val_x[a : min(a + bs, hi)], self.val_y[a : min(a + bs, hi)]
        else:
            opts = _loader_options(self.ctx.world_size, self.device)
            yield from DataLoader(Subset(self.val_set, range(lo, hi)), batch_size=bs, **opts)

    def _save_checkpoint(self, epochs_done: int, wall: float) -> None:
        rng = ckpt.rng_state()
        rngs: list[Any] = [rng]
        if self.ctx.distributed:
            import torch.distributed as dist

            rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rngs, rng)
        if not self.ctx.is_main:
            return
        assert self.ckpt_path is not None
        ckpt.save_checkpoint(
            self.ckpt_path,
            {
                "spec": self.spec.model_dump(mode="json"),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": epochs_done,
                "iteration": epochs_done * self.ipe,
                "wall_time": wall,
                "rng": rngs,
                "tracker": self.tracker.state_dict(),
            },
        )


class _EpochBatchSampler:
    """Batch sampler of lazy datasets: this process's indices of each iteration.

    Iterated in the main process (setting ``epoch`` before an epoch is enough); yields
    exactly the indices the in-memory path uses.
    """

    def __init__(self, run: _Run) -> None:
        self.seed, self.size, self.ipe = run.spec.seed, run.train_size, run.ipe
        self.kn, self.offset, self.batch = run.kn, run.offset, run.process_batch
        self.epoch = 0

    def __len__(self) -> int:
        return self.ipe

    def __iter__(self) -> Iterator[list[int]]:
        perm = epoch_permutation(self.seed, self.epoch, self.size)
        for i in range(self.ipe):
            lo = i * self.kn + self.offset
            yield perm[lo : lo + self.batch].tolist()


def _loader_options(world_size: int, device: torch.device) -> dict[str, Any]:
    """DataLoader settings for lazy datasets: the host's cores shared by the processes.

    Workers are started per epoch (not persistent), so none outlive a run.
    """
    workers = max(1, min(8, (os.cpu_count() or 2) // world_size - 1))
    return {"num_workers": workers, "pin_memory": device.type == "cuda"}
