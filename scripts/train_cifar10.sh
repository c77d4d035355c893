#!/usr/bin/env bash
# DDPM's CIFAR-10 recipe (Ho et al. 2020, appendix B) on one GPU:
#   the ddpm-cifar10 U-Net (35.7M parameters, dropout 0.1), unconditional, T = 1000 linear betas,
#   Adam at lr 2e-4 with 5000 linear warm-up steps, batch 128, gradient clip 1,
#   EMA 0.9999 (plain, no warm-up), random horizontal flips, 800k steps.
#
# usage: scripts/train_cifar10.sh DATA_DIR [OUT_DIR] [extra minidiff train flags...]
#   DATA_DIR  the cifar-10-batches-py folder (data_batch_1..5 from
#             https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, read without unpickling)
#   OUT_DIR   run directory (default runs/ddpm-cifar10); rerun with --resume to continue after a stop
#   STEPS=N   environment variable: fewer steps for a trial run (default 800000)
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
exec minidiff train \
  --data "$DATA" --out "$OUT" \
  --preset ddpm-cifar10 --conditioning none --dropout 0.1 \
  --num-train-timesteps 1000 --beta-schedule linear --prediction-type epsilon \
  --optimizer adam --lr 2e-4 --weight-decay 0 --warmup-steps 5000 \
  --batch-size 128 --grad-clip 1 --ema-decay 0.9999 --no-ema-warmup --hflip \
  --steps "${STEPS:-800000}" --save-every 5000 --sample-every 20000 --sample-steps 50 --log-every 100 \
  --device gpu --dtype float32 \
  "$@"
