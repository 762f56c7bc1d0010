#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md's "On a GPU" section, as one script for a machine
# lent for a few minutes: one NVIDIA GPU, its own python3 with torch and torchvision, no network.
#
#   benchmarks/gpu_session.sh OUTDIR [WHEELS]
#
# WHEELS (optional) is a folder of wheels for what that python3 lacks (Ray and its dependencies,
# pycocotools), installed with pip --no-index into a private target, never over the system's.
# It runs, each step under its own time limit so that one hang cannot eat the lease:
#   1. what the machine is (GPU, driver, torch, torchvision, Ray);
#   2. the quickstart on the GPU under a time budget (Ray Train with --use-gpu --amp bf16, one
#      worker; Ray Data segmentation with one GPU actor; COCO evaluation): its summary.json;
#   3. a short fp16 training (--amp fp16, torch's GradScaler) on the same data;
#   4. benchmarks/aspect_grouping.py on CUDA with the R50 preset, if present.
# Logs and summaries go to OUTDIR.
set -u
out=${1:?usage: gpu_session.sh OUTDIR [WHEELS]}
wheels=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu-site "$wheels"/*.whl || exit 1
    export PYTHONPATH=/tmp/gpu-site:$PWD
else
    export PYTHONPATH=$PWD
fi
# Ray's workers must not look for a token the machine does not have, nor report usage.
export RAY_USAGE_STATS_ENABLED=0

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to OUTDIR/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc in $((SECONDS - started)) s"
    tail -n 6 "$out/$name.log" | cut -c1-240
}

step machine 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader;
    nproc; python3 -c "import sys, torch, torchvision, ray; print(sys.version.split()[0], torch.__version__,
    torchvision.__version__, ray.__version__, torch.cuda.get_device_name(0))"'

step quickstart 330 python3 -m jobs.quickstart --use-gpu --num-workers 1 --budget-minutes 4 \
    --workdir /tmp/gpu-quickstart --fresh
cp /tmp/gpu-quickstart/summary.json "$out/quickstart_summary.json" 2>/dev/null
cp /tmp/gpu-quickstart/train/metrics.jsonl "$out/quickstart_metrics.jsonl" 2>/dev/null

step train_fp16 150 python3 -m jobs.train \
    --train-annotations /tmp/gpu-quickstart/data/train/annotations.json \
    --train-images /tmp/gpu-quickstart/data/train/images --output /tmp/gpu-fp16 --preset small \
    --num-workers 1 --use-gpu --amp fp16 --optimizer adamw --lr 0.004 --max-steps 60 --log-every 20

if [ -f benchmarks/aspect_grouping.py ]; then
    step aspect_grouping 150 python3 benchmarks/aspect_grouping.py --device cuda
fi
