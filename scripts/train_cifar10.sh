#!/usr/bin/env bash
# DDPM's CIFAR-10 recipe (Ho et al. 2020, appendix B) on one GPU:
#   the ddpm-cifar10 U-Net (35.7M parameters, dropout 0.1), unconditional, T = 1000 linear betas,
#   Adam at lr 2e-4 with 5000 linear warm-up steps, batch 128, gradient clip 1,
#   EMA 0.9999 (plain, no warm-up), random horizontal flips, 800k steps.
# On a CPU (no GPU seen by CuPy) a much smaller run: the small U-Net at 16x16 (--resolution 16),
#   batch 32, lr 1e-3, 500 warm-up steps, EMA 0.999, 5000 steps: blurry but recognisable colours and shapes.
#
# Get the data: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (tar xzf it; DATA_DIR is the
# cifar-10-batches-py folder it holds).
#
# usage: scripts/train_cifar10.sh DATA_DIR [OUT_DIR] [extra minidiff train flags...]
#   DATA_DIR  the cifar-10-batches-py folder (data_batch_1..5 from
#             https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, read without unpickling)
#   OUT_DIR   run directory (default runs/ddpm-cifar10); rerun with --resume to continue after a stop
#   STEPS=N   environment variable: fewer steps for a trial run (default 800000 on a GPU, 5000 on a CPU)
# The progress bar prints the loss and images/s; log.jsonl records images_per_s every --log-every steps.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR [OUT_DIR] [extra minidiff train flags...]  (DATA_DIR: cifar-10-batches-py)" >&2
  exit 2
fi
DATA=$1; shift
OUT=${1:-runs/ddpm-cifar10}; [ $# -gt 0 ] && shift
if [ ! -d "$DATA" ]; then
  echo "$0: data directory '$DATA' not found (expected the cifar-10-batches-py folder)" >&2
  exit 2
fi
if ! ls "$DATA"/data_batch_[1-5] "$DATA"/cifar-10-batches-py/data_batch_[1-5] >/dev/null 2>&1 \
   && ! ls "$DATA"/data_batch_* "$DATA"/cifar-10-batches-py/data_batch_* >/dev/null 2>&1; then
  echo "$0: no data_batch_1..data_batch_5 in '$DATA'; get https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" \
       "and pass its cifar-10-batches-py folder" >&2
  exit 2
fi
if python -c "from minidiff.backend import gpu_available; raise SystemExit(0 if gpu_available() else 1)"; then
  SIZE=(--device gpu --preset ddpm-cifar10 --batch-size 128 --lr 2e-4 --warmup-steps 5000 --ema-decay 0.9999
        --save-every 5000 --sample-every 20000); DEFAULT_STEPS=800000
else  # CPU: the small U-Net at 16x16
  SIZE=(--device cpu --preset small --resolution 16 --batch-size 32 --lr 1e-3 --warmup-steps 500 --ema-decay 0.999
        --save-every 1000 --sample-every 1000); DEFAULT_STEPS=5000
fi
exec minidiff train \
  --data "$DATA" --out "$OUT" \
  --conditioning none --dropout 0.1 \
  --num-train-timesteps 1000 --beta-schedule linear --prediction-type epsilon \
  --optimizer adam --weight-decay 0 "${SIZE[@]}" \
  --grad-clip 1 --no-ema-warmup --hflip \
  --steps "${STEPS:-$DEFAULT_STEPS}" --sample-steps 50 --log-every 100 \
  --dtype float32 \
  "$@"
