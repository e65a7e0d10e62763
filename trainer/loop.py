"""``fit``: the large-minibatch training loop of Goyal et al. 2017, made exact.

One iteration, for k workers of n samples (total kn) over P processes:

1. The LR comes from the run's frozen :class:`trainer.schedule.Schedule` (warmup, decay).
2. The batches follow the run's :class:`trainer.batches.Layout` (one shuffle per epoch).
3. A process's workers go through ONE forward pass; per-worker BN (``bn_local``) is
   grouped BN with groups of n, which equals k separate BNs. Each micro-batch's loss is
   sum(cross-entropy) / kn (Remark 3), so gradients accumulate over micro-batches and sum
   over processes (DDP with a summing hook) into the gradient of the mean over kn.
4. The optimizer steps (trainer/optim.py); metrics wait on the device in a
   :class:`MetricBuffer` and come to the host about four times a second (one
   synchronisation), where divergence is checked, ``should_stop`` is polled and the sink
   receives the points.

Micro-batches: ``spec.micro_batch`` smaller than a process's kn/P splits the forward into
chunks that are whole multiples of n (so BN groups stay whole workers); below n it must
divide n, and the BN groups of ``bn_local``/``cbn`` become the micro-batch (a worker's
statistics are then taken per micro-batch), those of ``bn_ghost`` gcd(ghost_batch,
micro_batch), and ``bn_sync`` normalises over each micro-batch (of every process).
Running statistics are those of one pass however the batch is split: chunks average
theirs (:class:`trainer.norms.RunningStatsAverage`), processes theirs before evaluation
and checkpoints (:func:`trainer.distributed.average_buffers_`).

Timing: ``data_time`` is the time spent shuffling and fetching batches (indexing the
in-memory tensors, or waiting for the DataLoader), ``compute_time`` the rest of the
epoch's training time (forward, backward, step, metric flushes); ``epoch_time`` is their
sum, validation and checkpoints excluded. On CUDA, kernels run asynchronously: single
``step_time`` values are smoothed over a flush window, whose sum is exact (each flush
synchronises).

Speed on a GPU: in-memory data lives on the device (trainer/batches.py), cuDNN autotunes
and fp32 matmuls use TF32 (:func:`trainer.distributed.configure_device`), 2-D conv models
and their inputs are channels_last, ``precision: bf16`` autocasts the forward, ``compile``
wraps the training forward in ``torch.compile``; nothing between flushes waits for the
device (tests/test_gpu_paths.py counts the syncs).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer import RunConfigError
from trainer import checkpoint as ckpt
from trainer import distributed as tdist
from trainer.batches import Batch, Batches, Layout
from trainer.metrics import EvalPoint, SummaryTracker
from trainer.optim import build_optimizer, set_lr
from trainer.schedule import Schedule
from trainer.sink import MetricSink, NullSink
from trainer.spec import RunSpec

__all__ = ["FitResult", "fit"]

# Metric flushes aim at four per second (one host sync each, so live curves lag by at most
# this much); never fewer samples of the loss than this many iterations apart (bounds how
# far a diverged run overshoots before it is stopped). should_stop is asked at most every
# POLL_INTERVAL_S (each flush): it must be cheap, as the worker's flag read is.
MAX_FLUSH_EVERY = 200
FLUSH_INTERVAL_S = 0.25
POLL_INTERVAL_S = 0.25


@dataclass
class FitResult:
    """How a ``fit`` call ended."""

    status: str  # succeeded | diverged | cancelled
    iterations: int  # iterations completed (a diverged run's count includes its last)
    epochs: float  # iterations / iters_per_epoch
    diverged_step: int | None
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON record of the result (summary.json, the worker's result file)."""
        return asdict(self)


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
    initialised here and only rank 0 writes to the sink. ``run_dir`` holds
    ``checkpoint.pt`` (written at each epoch end when ``spec.checkpoint``, by the first
    process of every node into that node's own ``run_dir``; resumed from when ``resume``,
    the newest any process holds). ``should_stop`` is polled about 4 times a second and at each
    epoch end; True ends the run as cancelled (the last checkpoint is kept).
    """
    ctx: tdist.DistContext | None = None
    run: _Run | None = None
    try:
        ctx, device = tdist.init_from_env(spec.device)
        if ctx.distributed and ctx.world_size != spec.processes:
            raise RunConfigError(
                f"nproc: the spec asks for nodes x nproc = {spec.nodes} x {spec.nproc} = "
                f"{spec.processes} processes, torchrun started {ctx.world_size}"
            )
        if not ctx.distributed and spec.processes > 1:
            warnings.warn(
                f"nodes={spec.nodes}, nproc={spec.nproc} but not launched by torchrun: the "
                f"{spec.workers} workers run as virtual workers in one process (same updates)",
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


class IterationRecord(NamedTuple):
    """What the host knows of an iteration without a sync."""

    it: int
    lr: float
    step_time: float
    t_end: float


class IterationFigures(NamedTuple):
    """An iteration's device figures, once brought to the host."""

    loss: float
    wrong: float  # misclassified samples of the kn
    grad_norm: float


@dataclass
class MetricBuffer:
    """Iterations since the last flush: records on the host, figures still on the device."""

    flush_every: int = 1
    last_poll: float = -math.inf  # the first flush polls: a cancel is seen at once
    records: list[IterationRecord] = field(default_factory=list)
    figures: list[torch.Tensor] = field(default_factory=list)

    def add(self, record: IterationRecord, *figures: torch.Tensor) -> None:
        self.records.append(record)
        self.figures += figures

    def full(self) -> bool:
        return len(self.records) >= self.flush_every

    def take(self) -> tuple[list[IterationRecord], torch.Tensor]:
        """The pending records and their figures as one (rows, 3) device tensor."""
        records, figures = self.records, torch.stack(self.figures)
        self.records, self.figures = [], []
        return records, figures.view(len(records), len(IterationFigures._fields))


@dataclass
class EpochTotals:
    loss: float = 0.0
    err: float = 0.0
    data_time: float = 0.0


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
        self.should_stop, self.progress = should_stop, progress
        self.ckpt_path = run_dir / ckpt.CHECKPOINT_NAME if run_dir else None
        self.buffer = MetricBuffer()
        self.totals = EpochTotals()
        self.ddp: nn.Module | None = None

    # --- setup ---------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        from trainer.data import load_datasets
        from trainer.models import build_model, uses_channels_last
        from trainer.norms import RunningStatsAverage, norm_group_size, set_group_size

        spec, ctx, device = self.spec, self.ctx, self.device
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        # Under torchrun a stop during generation would leave the other ranks waiting in a
        # collective: they all generate, and agree on a cancel right after (run()).
        splits = load_datasets(spec, None if ctx.distributed else self.should_stop)
        sizes = len(splits.train), len(splits.val)  # type: ignore[arg-type]
        self.layout = layout = Layout.build(spec, *sizes, ctx.rank, ctx.world_size)
        self.channels_last = uses_channels_last(spec, device)
        self.data = Batches(
            splits, layout, ctx.world_size, device, channels_last=self.channels_last
        )
        self.schedule = Schedule.from_spec(spec, layout.iters_per_epoch)

        fmt = torch.channels_last if self.channels_last else torch.preserve_format
        self.model = build_model(spec, num_classes=splits.num_classes).to(device, memory_format=fmt)
        set_group_size(self.model, norm_group_size(spec, layout.micro_batch))
        bn_stats = RunningStatsAverage(self.model)
        self.chunk_stats = bn_stats if len(layout.chunks) > 1 and bn_stats.stats else None
        self.optimizer = build_optimizer(self.model, spec)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.noise, self.health = self._probes()
        self.probes = [p for p in (self.health, self.noise) if p is not None]  # health first

        self.start_epoch, self.wall_offset = 0, 0.0
        self.tracker = SummaryTracker(
            total_iters=layout.total_iters,
            total_batch=layout.total_batch,
            peak_lr=spec.peak_lr,
            target_accuracy=spec.target_accuracy,
            samples_dropped_per_epoch=layout.samples_dropped_per_epoch,
            backward_splits=layout.backward_splits,
        )
        # Every process takes part (each node reads its own folder), so all start alike.
        state = ckpt.agree_on_checkpoint(self.ckpt_path if resume else None, spec, ctx)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.start_epoch = int(state["epoch"])
            self.wall_offset = float(state["wall_time"])
            self.tracker = SummaryTracker.from_state_dict(state["tracker"])
            self.tracker.target_accuracy = spec.target_accuracy
            if self.tracker.total_iters != layout.total_iters:
                # Extended (more epochs): the planned second half moved, and the parent's
                # oscillation sum covers other iterations; count the new window's alone.
                self.tracker.total_iters = layout.total_iters
                self.tracker.osc_sum, self.tracker.osc_count = 0.0, 0
            if ctx.rank < len(state["rng"]):
                ckpt.set_rng_state(state["rng"][ctx.rank])
            if self.noise is not None and "noise" in state:
                self.noise.load_state_dict(state["noise"])  # the EMA continues
        self.resumed = state is not None
        # DDP after loading: it broadcasts rank 0's parameters and buffers at construction.
        self.ddp = tdist.wrap_ddp(self.model, ctx, device) if ctx.distributed else None
        self.net: nn.Module = self.ddp if self.ddp is not None else self.model
        if spec.compile:
            # The training forward only (validation stays eager: train and eval modes
            # would be two graphs). self.model keeps the plain module for state_dict.
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        self.setup_s = time.perf_counter() - t0

    def _probes(self) -> tuple[Any, Any]:
        """The noise-scale and layer-health probes the spec asks for (issue 13), or None."""
        from trainer.health import HealthProbe
        from trainer.noise import NoiseProbe, small_batch_size
        from trainer.norms import norm_group_size, set_group_size

        spec, layout, model = self.spec, self.layout, self.model
        noise = health = None
        # With backward_splits an update's gradient is of kn/m samples taken from one
        # forward: no plain big-batch gradient to pair with a small one.
        if spec.noise_every > 0 and spec.backward_splits == 1:
            train_group = norm_group_size(spec, layout.micro_batch)
            norms = nn.ModuleList(m for m in model.modules() if hasattr(m, "group_size"))

            def regroup(size: int | None) -> None:
                group = train_group if size is None else norm_group_size(spec, size)
                if group != train_group or size is None:
                    set_group_size(norms, group)  # the norms alone: walking the model is slow

            noise = NoiseProbe(
                model=model,
                params=self.params,
                every=spec.noise_every,
                total_batch=layout.total_batch,
                first_chunk=layout.micro_batch,
                chunked=len(layout.chunks) > 1,
                small=small_batch_size(spec.workers, spec.batch_per_worker),
                pair_previous=spec.workers == 1 and not self.ctx.distributed,
                regroup=regroup,
                autocast=self._autocast,
            )
        if spec.health_every > 0:
            health = HealthProbe(model, spec.health_every, dead=not spec.compile)
        return noise, health

    def release(self) -> None:
        """Drop the DDP wrapper now, not whenever GC gets to it."""
        self.ddp = self.net = None  # type: ignore[assignment]

    def _meta(self) -> dict[str, Any]:
        layout = self.layout
        meta: dict[str, Any] = {
            "iters_per_epoch": layout.iters_per_epoch,
            "total_iters": layout.total_iters,
            "total_batch": layout.total_batch,
            "peak_lr": self.spec.peak_lr,
            "warmup_iters": self.schedule.warmup_iters,
            "device": str(self.device),
            "precision": self.spec.precision,
            "channels_last": self.channels_last,
            "compile": self.spec.compile,
            "tf32": self.device.type == "cuda"
            and torch.get_float32_matmul_precision() != "highest",
            "nproc": self.ctx.world_size,
            "nodes": self.ctx.nodes,
            "params": sum(p.numel() for p in self.params),
            "train_size": layout.train_size,
            "val_size": layout.val_size,
            "samples_dropped_per_epoch": layout.samples_dropped_per_epoch,
            "in_memory": self.data.in_memory,
            "data_on_device": self.data.on_device,
            "micro_batch": layout.micro_batch,
            "backward_splits": layout.backward_splits,
            "start_step": self.start_epoch * layout.iters_per_epoch,
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
        from trainer.data import LoadCancelled

        try:
            self._setup(resume)
        except LoadCancelled:
            return FitResult(status="cancelled", iterations=0, epochs=0.0, diverged_step=None)
        self.sink.start(self._meta())
        self.pbar = None
        if self.progress:
            from tqdm import tqdm

            self.pbar = tqdm(
                total=self.layout.total_iters,
                initial=self.start_epoch * self.layout.iters_per_epoch,
                unit="it",
                dynamic_ncols=True,
            )
        self.t_start = time.perf_counter()
        status, diverged_step, error = "succeeded", None, None
        # A cancel while the data loaded: stop before the first iteration.
        first_epoch = self.spec.epochs if self._stop_now() else self.start_epoch
        try:
            for epoch in range(first_epoch, self.spec.epochs):
                if self._train_epoch(epoch):
                    break
        except _Diverged as exc:
            status, diverged_step, error = "diverged", exc.step, str(exc)
        finally:
            if self.pbar is not None:
                self.pbar.close()
        if status == "succeeded" and self.tracker.iterations < self.layout.total_iters:
            status = "cancelled"  # stopped early, in whatever epoch: never "succeeded"
        if status != "succeeded" or self.start_epoch >= self.spec.epochs:
            self.tracker.wall_time = max(self.tracker.wall_time, self._wall())
        return FitResult(
            status=status,
            iterations=self.tracker.iterations,
            epochs=self.tracker.iterations / self.layout.iters_per_epoch,
            diverged_step=diverged_step,
            summary=self.tracker.summary(),
            error=error,
        )

    def _wall(self) -> float:
        return self.wall_offset + time.perf_counter() - self.t_start

    def _stop_now(self) -> bool:
        """Ask ``should_stop`` once, outside the metric flushes (every process agrees)."""
        stop = float(self.should_stop is not None and bool(self.should_stop()))
        if self.ctx.distributed:
            flag = torch.tensor([stop], device=self.device)
            tdist.all_reduce_sum_(flag, self.ctx)
            stop = flag.item()
        return stop > 0

    def _train_epoch(self, epoch: int) -> bool:
        """Train one epoch; True when a stop was requested (cancel after this epoch)."""
        if self.layout.backward_splits > 1:  # seed 004: one forward, m updates
            from trainer.splits import train_epoch

            return train_epoch(self, epoch)
        ipe, opt = self.layout.iters_per_epoch, self.optimizer
        self.totals = EpochTotals()
        t_epoch = t_prev = time.perf_counter()
        batches, stop = self.data.epoch(epoch), False
        for i in range(ipe):
            it = epoch * ipe + i
            lr = self.schedule.lr(it)
            set_lr(opt, lr)
            t0 = time.perf_counter()
            batch = next(batches)
            self.totals.data_time += time.perf_counter() - t0
            for probe in self.probes:
                probe.begin(it)
            loss, wrong = self._forward_backward(batch)
            grad_norm = _grad_norm(self.params)
            for probe in self.probes:
                probe.before_step(it, batch.x, batch.y, grad_norm)
            opt.step()
            for probe in self.probes:
                probe.after_step(it)
            opt.zero_grad(set_to_none=True)
            t_end = time.perf_counter()
            self.buffer.add(IterationRecord(it, lr, t_end - t_prev, t_end), loss, wrong, grad_norm)
            t_prev = t_end
            last = i == ipe - 1
            if last or self.buffer.full():
                stop = self._flush(force_poll=last)
                if stop and not last:
                    batches.close()
                    return True
        batches.close()
        self._end_epoch(epoch, time.perf_counter() - t_epoch)
        return stop

    def _forward_backward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Accumulate the gradient of sum(CE)/kn over the micro-batches (Remark 3)."""
        chunks, kn = self.layout.chunks, self.layout.total_batch
        stats = self.chunk_stats
        if stats is not None:
            stats.begin()
        losses, wrongs = [], []
        for j, (a, b) in enumerate(chunks):
            x, y = (batch.x, batch.y) if len(chunks) == 1 else (batch.x[a:b], batch.y[a:b])
            # DDP all-reduces once per iteration, on the last micro-batch's backward.
            last = j == len(chunks) - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else nullcontext()
            with sync:
                with self._autocast():
                    out = self.net(x)
                loss = F.cross_entropy(out.float(), y, reduction="sum") / kn
                loss.backward()
            if stats is not None:
                stats.chunk_done((b - a) / self.layout.process_batch)
            losses.append(loss.detach())
            wrongs.append((out.detach().argmax(1) != y).sum().float())
        if len(chunks) == 1:
            return losses[0], wrongs[0]
        if stats is not None:
            stats.end()
        return torch.stack(losses).sum(), torch.stack(wrongs).sum()

    # --- metrics -------------------------------------------------------------------------
    def _flush(self, force_poll: bool) -> bool:
        """Bring pending figures to the host (one sync), log them, check divergence.

        Returns whether a stop was requested. In DDP the loss and error columns are
        summed over processes in one all-reduce that also carries rank 0's stop flag and
        next flush interval, so every process takes the same decisions.
        """
        buf = self.buffer
        records, values = buf.take()
        now = time.perf_counter()
        stop = 0.0
        if self.should_stop is not None and (force_poll or now - buf.last_poll >= POLL_INTERVAL_S):
            buf.last_poll = now
            stop = float(bool(self.should_stop()))
        mean_step = sum(r.step_time for r in records) / len(records)
        every = float(min(MAX_FLUSH_EVERY, max(1, int(FLUSH_INTERVAL_S / max(mean_step, 1e-9)))))
        if self.ctx.distributed:
            control = torch.tensor(
                [stop, every] if self.ctx.is_main else [0.0, 0.0], device=values.device
            )
            packed = torch.cat([values[:, :2].reshape(-1), control])
            tdist.all_reduce_sum_(packed, self.ctx)
            values = torch.cat([packed[:-2].view(-1, 2), values[:, 2:]], dim=1)
            stop, every = packed[-2:].tolist()
        figures = [IterationFigures(*row) for row in values.tolist()]
        buf.flush_every = int(every)
        self._log_iterations(records, figures)
        self._log_probes(records)
        return stop > 0

    def _log_iterations(
        self, records: list[IterationRecord], figures: list[IterationFigures]
    ) -> None:
        kn, ipe = self.layout.update_batch, self.layout.iters_per_epoch  # kn/m per update
        factor = self.spec.divergence_factor
        for (it, lr, step_time, t_end), (loss, wrong, grad_norm) in zip(
            records, figures, strict=True
        ):
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
            self.totals.loss += loss
            self.totals.err += err
            first = self.tracker.first_loss
            if not math.isfinite(loss) or (first is not None and loss > factor * first):
                self.tracker.wall_time = self._wall()
                raise _Diverged(
                    it,
                    f"loss {loss:.4g} at step {it} (first loss {first:.4g}, "
                    f"divergence_factor {factor:g})",
                )
        if self.pbar is not None:
            self.pbar.update(len(records))
            self.pbar.set_postfix(
                loss=f"{figures[-1].loss:.4f}", lr=f"{records[-1].lr:.4g}", refresh=False
            )

    def _log_probes(self, records: list[IterationRecord]) -> None:
        """The noise-scale and layer-health points measured since the last flush."""
        ends, ipe = {r.it: r.t_end for r in records}, self.layout.iters_per_epoch
        for probe in self.probes:
            for it, values in probe.take():
                wall = self.wall_offset + ends.get(it, records[-1].t_end) - self.t_start
                self.sink.log(it, values, epoch=(it + 1) / ipe, wall_time=wall)

    def _end_epoch(self, epoch: int, epoch_time: float) -> None:
        spec, ipe, totals = self.spec, self.layout.iters_per_epoch, self.totals
        last_it = (epoch + 1) * ipe - 1
        train_err = totals.err / ipe
        values = {
            "epoch_time": epoch_time,
            "data_time": totals.data_time,
            "compute_time": epoch_time - totals.data_time,
            "train_loss_epoch": totals.loss / ipe,
            "train_err_epoch": train_err,
        }
        tdist.average_buffers_(self.model, self.ctx)
        evaluated = None
        if (epoch + 1) % spec.eval_every == 0 or epoch + 1 == spec.epochs:
            evaluated = self._evaluate()
            if evaluated is not None:
                values["val_loss"], values["val_err"] = evaluated
        wall = self._wall()
        self.sink.log(last_it, values, epoch=float(epoch + 1), wall_time=wall)
        self.tracker.add_epoch(train_err)
        if evaluated is not None:
            val_loss, val_err = evaluated
            self.tracker.add_eval(EvalPoint(last_it + 1, epoch + 1, wall, val_err, val_loss))
        self.tracker.wall_time = wall
        if self.ckpt_path is not None and spec.checkpoint:
            self._save_checkpoint(epoch + 1, wall)

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float] | None:
        """(val_loss, val_err) of the whole validation set, split over the processes."""
        size = self.layout.val_size
        if size == 0:
            return None
        model, ctx = self.model, self.ctx
        model.eval()
        lo, hi = size * ctx.rank // ctx.world_size, size * (ctx.rank + 1) // ctx.world_size
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        for x, y in self.data.val(lo, hi, max(self.layout.micro_batch, 256)):
            with self._autocast():
                out = model(x)
            totals[0] += F.cross_entropy(out.float(), y, reduction="sum").double()
            totals[1] += (out.argmax(1) != y).sum()
        tdist.all_reduce_sum_(totals, ctx)
        model.train()
        loss_sum, wrong = totals.tolist()
        return loss_sum / size, wrong / size

    def _save_checkpoint(self, epochs_done: int, wall: float) -> None:
        rng = ckpt.rng_state()
        rngs: list[Any] = [rng]
        if self.ctx.distributed:
            import torch.distributed as dist

            rngs = [None] * self.ctx.world_size
            dist.all_gather_object(rngs, rng)
        # Nodes do not share run folders: the first process of each writes its node's copy.
        if not self.ctx.node_local_main:
            return
        assert self.ckpt_path is not None
        ckpt.save_checkpoint(
            self.ckpt_path,
            {
                "spec": self.spec.model_dump(mode="json"),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": epochs_done,
                "iteration": epochs_done * self.layout.iters_per_epoch,
                "wall_time": wall,
                "rng": rngs,
                "tracker": self.tracker.state_dict(),
                **({"noise": self.noise.state_dict()} if self.noise is not None else {}),
            },
        )


def _grad_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients, on the device (no sync)."""
    norms = torch._foreach_norm([p.grad for p in params if p.grad is not None])
    return torch.linalg.vector_norm(torch.stack(norms))
