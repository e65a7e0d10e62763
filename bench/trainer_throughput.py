"""batchlab's trainer against a plain PyTorch loop written the way seed 004 writes it.

Same model, same data (synthetic, shaped for the model: 28x28 images for simple_cnn,
40 features for mnist1d_cnn, CIFAR-shaped 3x32x32 for resnet20), same batch, same
optimizer, same precision (``--precision bf16``: both forwards under bf16 autocast). The
plain loop uses a shuffling DataLoader, copies each batch to the device and logs nothing;
batchlab's trainer logs every iteration's metrics to a JSONL sink and, on a GPU, keeps the
data there and runs conv models channels_last. Runs alternate so both see the same
machine load; the figure is the ratio of median samples per second.

    .venv/bin/python bench/trainer_throughput.py --batch 256 --repeats 3
    .venv/bin/python bench/trainer_throughput.py --device cuda --precision bf16 \
        --model mnist1d_cnn resnet20 --size 51200
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.data import load_datasets  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.sink import JsonlSink  # noqa: E402
from trainer.spec import RunSpec  # noqa: E402

# Seed 004's SimpleModel has no norm layers; the others keep their default BN (one worker:
# plain batch norm over the batch, in both loops).
NORMS = {"simple_cnn": "none", "mnist1d_cnn": "bn_local", "resnet20": "bn_local"}


def make_spec(
    batch: int,
    size: int,
    epochs: int,
    device: str = "cpu",
    model: str = "simple_cnn",
    precision: str = "fp32",
) -> RunSpec:
    return RunSpec(
        model=model,
        dataset="synthetic",
        dataset_size=size,
        epochs=epochs,
        workers=1,
        batch_per_worker=batch,
        base_lr=0.02,
        ref_batch=batch,
        warmup="none",
        decay="constant",
        momentum=0.5,
        weight_decay=0.0,
        norm=NORMS[model],
        eval_every=epochs,  # validate once, at the end, as the seed does per epoch
        checkpoint=False,
        divergence_factor=1e6,  # a throughput run never stops early
        device=device,
        precision=precision,
    )


def plain_loop(spec: RunSpec) -> float:
    """Seed 004's loop: DataLoader(shuffle=True), forward, loss, zero_grad, backward, step."""
    torch.manual_seed(spec.seed)
    splits = load_datasets(spec)
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=spec.batch_per_worker, shuffle=True, drop_last=True
    )
    device = torch.device(spec.device)
    model = build_model(spec, num_classes=splits.num_classes).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=spec.base_lr, momentum=spec.momentum)
    model.train()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec.precision == "bf16"
        else contextlib.nullcontext()
    )
    samples = 0
    t0 = time.perf_counter()  # after setup, like fit's samples_per_s
    for _ in range(spec.epochs):
        for data, target in loader:
            data, target = data.to(device), target.to(device)
            with autocast:
                output = model(data)
            loss = F.cross_entropy(output.float(), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            samples += data.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()  # the queued kernels are part of the time
    return samples / (time.perf_counter() - t0)


def batchlab_loop(spec: RunSpec) -> float:
    from trainer import fit

    with tempfile.TemporaryDirectory() as tmp:
        sink = JsonlSink(Path(tmp) / "metrics.jsonl")
        result = fit(spec, sink, run_dir=None, resume=False)
        sink.close()
    # Same scope as the plain loop's timer: the training iterations (data + compute, with
    # every metric logged), not setup or the final validation.
    return float(result.summary["samples_per_s"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["simple_cnn"], choices=sorted(NORMS))
    ap.add_argument("--batch", type=int, nargs="+", default=[256])
    ap.add_argument("--size", type=int, default=12800, help="synthetic samples (80%% train)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="both loops on it")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()

    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {where}, "
        f"{args.precision}"
    )
    print(
        "| model | n | plain loop (samples/s) | batchlab trainer + JSONL sink (samples/s) | ratio |"
    )
    print("|---|---|---|---|---|")
    for model in args.model:
        for batch in args.batch:
            spec = make_spec(batch, args.size, args.epochs, args.device, model, args.precision)
            load_datasets(spec)  # build the data once, outside the timings
            plain, ours = [], []
            for _ in range(args.repeats):
                plain.append(plain_loop(spec))
                ours.append(batchlab_loop(spec))
            p, o = statistics.median(plain), statistics.median(ours)
            print(f"| {model} | {batch} | {p:,.0f} | {o:,.0f} | {o / p:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
