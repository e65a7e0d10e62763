#!/usr/bin/env bash
# Everything that needs a GPU, in one prepared run (under 8 minutes on one GPU):
#   1. the pytest tests marked `gpu`;
#   2. `batchlab api` + a worker pinned to GPU 0 training a run submitted with the CLI;
#   3. DDP with NCCL: `batchlab train SPEC --nproc N`, N = number of GPUs (1 allowed);
#   4. the trainer against a plain PyTorch loop on the GPU, MNIST-1D CNN and ResNet-20, bf16
#      (bench/trainer_throughput.py);
#   5. ResNet-50, synthetic ImageNet-shaped data, bf16, batch 256 (bench/resnet50_bf16.py).
# The figures go to docs/benchmarks/gpu.md (--out FILE to change), quoted by
# docs/benchmarks.md. Needs a CUDA build of torch and the `vision` extra (torchvision).
#
#   bench/gpu_check.sh                  # on a GPU machine, from the repository root
#   bench/gpu_check.sh --cpu-dry-run    # every step on the CPU, tiny sizes (tests run it)
#
# Exit status: 0 when every step passed, else 1 (the report says which failed).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY="$(command -v python3)"
DRY=0
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-dry-run) DRY=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bench/gpu_check.sh [--cpu-dry-run] [--out FILE]" >&2; exit 2 ;;
  esac
  shift
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
if [ "$DRY" = 1 ]; then
  OUT="${OUT:-$WORK/gpu_check.md}"   # never overwrite the recorded GPU figures
  DEVICE=cpu NPROC=2 GPUS=none
  E2E_SET=(--set model=mlp --set dataset_size=320 --set epochs=2 --set batch_per_worker=16)
  DDP_SET=(--set model=mlp --set dataset_size=320 --set epochs=1 --set batch_per_worker=8)
  THROUGHPUT=(--model mnist1d_cnn resnet20 --precision bf16 --batch 32 --size 320 --epochs 1 --repeats 1)
  RESNET=(--model resnet20 --batch 2 --iters 1 --warmup 1)
else
  OUT="${OUT:-$ROOT/docs/benchmarks/gpu.md}"
  DEVICE=cuda GPUS=0
  NPROC="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
  E2E_SET=(--set model=resnet20 --set dataset_size=12800 --set epochs=2 --set batch_per_worker=256)
  DDP_SET=(--set model=resnet20 --set dataset_size=12800 --set epochs=2 --set batch_per_worker=256)
  THROUGHPUT=(--model mnist1d_cnn resnet20 --precision bf16 --batch 256 --size 51200 --epochs 2 --repeats 3)
  RESNET=(--model resnet50 --batch 256 --iters 30 --warmup 10)
fi
export BATCHLAB_HOME="$WORK/home" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
unset BATCHLAB_DATABASE_URL BATCHLAB_BROKER_URL BATCHLAB_TOKEN BATCHLAB_URL
cd "$ROOT" || exit 2
BATCHLAB=("$PY" -m batchlab.cli)
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
}
trap cleanup EXIT

FAILED=()
declare -A SECONDS_OF
step() {  # step NAME COMMAND...: run it here (each bounds its own time), log, time it
  local name="$1" t0=$SECONDS
  shift
  echo "== $name" >&2
  if "$@" >"$WORK/$name.log" 2>&1; then
    echo "   ok ($((SECONDS - t0)) s)" >&2
  else
    echo "   FAILED ($((SECONDS - t0)) s), last lines of $WORK/$name.log:" >&2
    tail -n 30 "$WORK/$name.log" >&2
    FAILED+=("$name")
  fi
  SECONDS_OF[$name]=$((SECONDS - t0))
}

# The spec every training step starts from; the steps override sizes with --set.
cat >"$WORK/spec.yaml" <<EOF
model: resnet20
dataset: synthetic
workers: 1
batch_per_worker: 256
ref_batch: 256
warmup: none
decay: constant
norm: bn_local
device: $DEVICE
checkpoint: false
EOF

# 1. tests marked gpu (skipped without CUDA; exit 5 = none collected counts as passed)
gpu_tests() {
  local files
  mapfile -t files < <(grep -l "mark.gpu" tests/test_*.py tests/*/test_*.py 2>/dev/null)
  [ "${#files[@]}" -gt 0 ] || { echo "no tests marked gpu"; return 0; }
  timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${files[@]}"
  local rc=$?
  [ "$rc" = 0 ] || [ "$rc" = 5 ]
}
step pytest-gpu gpu_tests

# 2. API + a worker pinned to GPU 0, a run submitted with the CLI, waited for
e2e() {
  local port url id
  port="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  url="http://127.0.0.1:$port"
  "${BATCHLAB[@]}" api --port "$port" >"$WORK/api.log" 2>&1 &
  PIDS+=($!)
  "${BATCHLAB[@]}" worker --gpus "$GPUS" >"$WORK/worker.log" 2>&1 &
  local worker=$!
  PIDS+=("$worker")
  for _ in $(seq 240); do  # the API answers and the worker is consuming, or it quit
    kill -0 "$worker" 2>/dev/null || { echo "the worker exited:"; cat "$WORK/worker.log"; return 1; }
    grep -q " ready\." "$WORK/worker.log" \
      && "$PY" -c "import urllib.request as u; u.urlopen('$url/api/health', timeout=2)" 2>/dev/null \
      && break
    sleep 0.5
  done
  id="$("${BATCHLAB[@]}" submit "$WORK/spec.yaml" --url "$url" --name "gpu check" \
    "${E2E_SET[@]}" --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["run"]["id"])')" \
    || return 1
  "${BATCHLAB[@]}" wait "$id" --url "$url" --timeout 240 --quiet \
    || { tail -n 40 "$WORK/worker.log"; return 1; }
  kill -0 "$worker" || return 1   # a worker that refused its GPU exits at once
  grep -E "^devices: |GPUs" "$WORK/worker.log" | head -3
  "$PY" - "$url" "$id" <<'PYEOF'
import json, sys, urllib.request
run = json.load(urllib.request.urlopen(f"{sys.argv[1]}/api/runs/{sys.argv[2]}"))
keys = ("status", "worker", "gpus", "device")
print(json.dumps({k: run.get(k) for k in keys}))
print(f"samples_per_s {run['summary']['samples_per_s']:.0f}")
PYEOF
}
step e2e-worker e2e

# 3. DDP over every GPU (NCCL on CUDA; gloo in the dry run)
ddp() {
  timeout 240 "${BATCHLAB[@]}" train "$WORK/spec.yaml" --out "$WORK/ddp" --nproc "$NPROC" --no-progress \
    --set workers="$NPROC" "${DDP_SET[@]}" || return 1
  "$PY" - "$WORK/ddp/summary.json" <<'PYEOF'
import json, sys
out = json.load(open(sys.argv[1]))
figures = {k: out["summary"][k] for k in ("total_batch", "samples_per_s", "final_val_err")}
print(json.dumps({"ddp_status": out["status"], **figures}))
PYEOF
}
step ddp ddp

# 4. trainer against a plain loop, same batch, same device
step throughput timeout 240 "$PY" bench/trainer_throughput.py --device "$DEVICE" "${THROUGHPUT[@]}"

# 5. ResNet-50 bf16 images/s
step resnet50-bf16 timeout 180 "$PY" bench/resnet50_bf16.py --device "$DEVICE" "${RESNET[@]}" \
  --json "$WORK/resnet50.json"

# --- the report ----------------------------------------------------------------------------
mkdir -p "$(dirname "$OUT")"
{
  echo "# GPU check ($( [ "$DRY" = 1 ] && echo "CPU dry run, tiny sizes: not figures" || echo "figures"))"
  echo
  echo "Written by \`bench/gpu_check.sh\` on $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "Device: $("$PY" -c "from worker.gpus import probe_devices; print(probe_devices([] if '$DRY' == '1' else ['0']).describe())")."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  for name in pytest-gpu e2e-worker ddp throughput resnet50-bf16; do
    result=ok
    [[ " ${FAILED[*]} " == *" $name "* ]] && result=FAILED
    echo "| $name | $result | ${SECONDS_OF[$name]:-} |"
  done
  echo
  echo "## Trainer vs plain PyTorch loop ($DEVICE, bf16, synthetic data shaped for each model)"
  echo
  grep -E '^(torch|\|)' "$WORK/throughput.log"
  echo
  echo "## ResNet-50, synthetic ImageNet-shaped data, bf16"
  echo
  grep -E 'images/s' "$WORK/resnet50-bf16.log"
  echo
  echo "## End to end (worker pinned to GPU $GPUS) and DDP (nproc $NPROC)"
  echo
  echo '```'
  cat "$WORK/e2e-worker.log"
  tail -n 1 "$WORK/ddp.log"
  echo '```'
} >"$OUT"
echo "report: $OUT (logs in $WORK)" >&2
[ "${#FAILED[@]}" = 0 ] || { echo "failed: ${FAILED[*]}" >&2; exit 1; }
