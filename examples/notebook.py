# %% [markdown]
# # batchlab from a notebook
#
# A large-minibatch run against its kn = ref_batch baseline, the way Goyal et al. 2017
# compare them: queue both on a running batchlab server, watch them train, pull the metric
# histories as a pandas DataFrame and draw the paper's Figure 2-style comparison.
#
# Runs top to bottom as a script too (the cells are jupytext "percent" cells):
#
#     batchlab up &                      # or docker compose up
#     python examples/notebook.py http://127.0.0.1:8000 --out runs/notebook
#
# The server URL comes from the first argument, else $BATCHLAB_URL, else
# http://127.0.0.1:8000; a token for writes from $BATCHLAB_TOKEN.

# %%
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import batchlab

parser = argparse.ArgumentParser(description="Submit a baseline + large-batch pair, compare.")
parser.add_argument("url", nargs="?", default=os.environ.get("BATCHLAB_URL"))
parser.add_argument("--out", default="runs/notebook", help="folder for the figure and CSV")
parser.add_argument("--epochs", type=int, default=8)
parser.add_argument("--dataset-size", type=int, default=4000, help="MNIST-1D samples")
parser.add_argument("--workers", type=int, default=8, help="k, with n = 32 each")
parser.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
# In Jupyter, sys.argv holds the kernel's own arguments: use the defaults there.
args = parser.parse_args(sys.argv[1:] if __name__ == "__main__" and "ipykernel" not in sys.modules
                         else [])  # fmt: skip
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

client = batchlab.Client(args.url)
print(client, client.health())

# %% [markdown]
# ## The runs
# k = 8 workers of n = 32 each (kn = 256, 8x the reference minibatch of 32), on
# MNIST-1D. The linear scaling rule gives a peak LR of 8 x base_lr; gradual warmup ramps
# up to it over the first epochs. `baseline=True` also queues the reference run: the same
# n = 32 on one worker, at base_lr, without warmup.

# %%
spec = {
    "model": "mnist1d_cnn",
    "dataset": "mnist1d",
    "dataset_size": args.dataset_size,
    "epochs": args.epochs,
    "workers": args.workers,
    "batch_per_worker": 32,
    "base_lr": 0.05,
    "ref_batch": 32,
    "scaling": "linear",
    "warmup": "gradual",
    "warmup_epochs": max(1, args.epochs // 4),
    "decay": "step",
    "milestones": [round(args.epochs * 3 / 4, 2)],
    "norm": "bn_local",
}
plan = client.schedule(spec)
print(
    f"kn={plan['total_batch']}: {plan['iters_per_epoch']} iterations per epoch, "
    f"warmup {plan['warmup_iters']} iterations up to peak LR {plan['peak_lr']:g}"
)

large, base = client.submit(spec, baseline=True, name=f"kn={plan['total_batch']} gradual warmup")
print(f"queued baseline run {base['id']} and large-batch run {large['id']}")

# %% [markdown]
# ## Watch them train
# One progress bar per run, with the ETA the worker estimates.

# %%
final = client.wait([base, large], timeout=args.timeout)
for run in final:
    summary = run.get("summary") or {}
    err = summary.get("final_val_err")
    note = f"final val err {100 * err:.2f}%" if err is not None else run.get("error") or ""
    print(f"run {run['id']} {run['status']}: {note}")
if any(run["status"] != "succeeded" for run in final):
    sys.exit(1)

# %% [markdown]
# ## Metric histories as a DataFrame
# Long format: one row per (run, key, step), with epoch and wall time.

# %%
metrics = client.metrics([base, large], keys=["train_err", "val_err", "lr"], x="epoch")
print(metrics.groupby(["run", "key"])["value"].agg(["count", "last"]))
metrics.to_csv(out / "metrics.csv", index=False)

runs = client.runs(group=large["group_id"])
print(runs.reindex(columns=["id", "name", "status", "total_batch", "peak_lr", "final_val_err"]))

# %% [markdown]
# ## The paper's picture
# Training error (%) against epochs, baseline in black; the LR schedule beneath.

# %%
fig = client.compare_figure([base, large], key="train_err", x="epoch", smoothing=0.6)
path = out / "compare.html"
fig.write_html(path, include_plotlyjs=True)  # self-contained: opens offline
print(f"wrote {path}")
