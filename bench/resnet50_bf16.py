"""ResNet-50 training throughput on synthetic ImageNet-shaped data in bf16 (images/s).

The model is batchlab's own (``trainer.models.build_model``, torchvision's ResNet-50 with
the spec's norm layers); the loop is the plain one a careful PyTorch user writes: one
fixed batch kept on the device, ``channels_last``, bf16 autocast, cuDNN autotuning, SGD
with momentum, no host sync until the clock stops. Reference: NVIDIA's published 2,470
images/s for ResNet-50 AMP training on one A100 (batch 256).

    .venv/bin/python bench/resnet50_bf16.py --batch 256 --json out.json
    .venv/bin/python bench/resnet50_bf16.py --device cpu --model resnet20 --batch 4 --iters 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from trainer.models import build_model  # noqa: E402
from trainer.spec import RunSpec, input_shape  # noqa: E402

NVIDIA_A100_AMP_IMAGES_S = 2470


def measure(model_name: str, batch: int, iters: int, warmup: int, device: str) -> dict:
    spec = RunSpec(
        model=model_name,
        dataset="synthetic",
        workers=1,
        batch_per_worker=batch,
        ref_batch=batch,
        device=device,
        precision="bf16",
        checkpoint=False,
    )
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    model = build_model(spec, num_classes=1000).to(dev, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch, *input_shape(spec), device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    model.train()
    for _ in range(warmup):  # cuDNN autotuning and allocator warm-up
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    seconds = time.perf_counter() - t0
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "model": model_name,
        "device": where,
        "torch": torch.__version__,
        "precision": "bf16",
        "batch": batch,
        "image_shape": list(input_shape(spec)),
        "iters": iters,
        "images_per_s": round(batch * iters / seconds, 1),
        "reference_images_per_s": NVIDIA_A100_AMP_IMAGES_S,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet50", choices=("resnet50", "resnet20"))
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=10, help="untimed iterations first")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    result = measure(args.model, args.batch, args.iters, args.warmup, args.device)
    print(
        f"{result['model']} bf16, batch {result['batch']}, {result['device']}: "
        f"{result['images_per_s']:,.0f} images/s "
        f"(NVIDIA A100 AMP reference: {NVIDIA_A100_AMP_IMAGES_S:,} images/s)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
