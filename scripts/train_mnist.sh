#!/usr/bin/env bash
# MNIST on one GPU: the small U-Net at 28x28 (1 channel), class-conditioned with classifier-free
# guidance (labels dropped with p = 0.1), Adam at lr 2e-4 with 1000 warm-up steps, batch 128,
# gradient clip 1, EMA 0.9995, dropout 0.1, no flips (digits are not mirror-symmetric), 30k steps.
#
# usage: scripts/train_mnist.sh DATA_DIR [OUT_DIR] [extra minidiff train flags...]
#   DATA_DIR  a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]
#             (Fashion-MNIST works the same way)
#   OUT_DIR   run directory (default runs/mnist); rerun with --resume to continue after a stop
#   STEPS=N   environment variable: fewer steps for a trial run (default 30000)
# Sample afterwards:  minidiff sample --checkpoint OUT_DIR --class 7 --guidance-scale 3 --device gpu
# The progress bar prints the loss and images/s; log.jsonl records images_per_s every --log-every steps.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 DATA_DIR [OUT_DIR] [extra minidiff train flags...]  (DATA_DIR: MNIST IDX files)" >&2
  exit 2
fi
DATA=$1; shift
OUT=${1:-runs/mnist}; [ $# -gt 0 ] && shift
if [ ! -e "$DATA" ]; then
  echo "$0: data directory '$DATA' not found (expected MNIST's train-images-idx3-ubyte[.gz])" >&2
  exit 2
fi
exec minidiff train \
  --data "$DATA" --out "$OUT" \
  --preset small --conditioning class --p-uncond 0.1 --dropout 0.1 \
  --num-train-timesteps 1000 --beta-schedule linear --prediction-type epsilon \
  --optimizer adam --lr 2e-4 --weight-decay 0 --warmup-steps 1000 \
  --batch-size 128 --grad-clip 1 --ema-decay 0.9995 --no-hflip \
  --steps "${STEPS:-30000}" --save-every 2000 --sample-every 5000 --sample-steps 50 --guidance-scale 3 \
  --log-every 100 --device gpu --dtype float32 \
  "$@"
