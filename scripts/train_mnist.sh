#!/usr/bin/env bash
# MNIST on one GPU: the small U-Net at 28x28 (1 channel), class-conditioned with classifier-free
# guidance (labels dropped with p = 0.1), Adam at lr 2e-4 with 1000 warm-up steps, batch 128,
# gradient clip 1, EMA 0.9995, dropout 0.1, no flips (digits are not mirror-symmetric), 30k steps.
# On a CPU (no GPU seen by CuPy) the same recipe runs smaller: 16x16 (--resolution 16), batch 64,
# lr 1e-3, 3000 steps (about an hour on 2 cores).
#
# Get the data: the four files of http://yann.lecun.com/exdb/mnist/ (mirror:
# https://ossci-datasets.s3.amazonaws.com/mnist/): train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz
# (Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist, same file names).
#
# usage: scripts/train_mnist.sh DATA_DIR [OUT_DIR] [extra minidiff train flags...]
#   DATA_DIR  a folder with train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz]
#             (Fashion-MNIST works the same way)
#   OUT_DIR   run directory (default runs/mnist); rerun with --resume to continue after a stop
#   STEPS=N   environment variable: fewer steps for a trial run (default 30000 on a GPU, 3000 on a CPU)
# Sample afterwards:  minidiff sample --checkpoint OUT_DIR --class 7 --guidance-scale 3 --device auto
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
if [ -d "$DATA" ] && ! ls "$DATA"/*idx3-ubyte* >/dev/null 2>&1; then
  echo "$0: no train-images-idx3-ubyte[.gz] (and train-labels-idx1-ubyte[.gz]) in '$DATA'; get them from" \
       "https://ossci-datasets.s3.amazonaws.com/mnist/" >&2
  exit 2
fi
if python -c "from minidiff.backend import gpu_available; raise SystemExit(0 if gpu_available() else 1)"; then
  SIZE=(--device gpu --batch-size 128 --lr 2e-4 --warmup-steps 1000); DEFAULT_STEPS=30000
else  # CPU: 16x16, smaller batch, higher lr, fewer steps
  SIZE=(--device cpu --resolution 16 --batch-size 64 --lr 1e-3 --warmup-steps 200); DEFAULT_STEPS=3000
fi
exec minidiff train \
  --data "$DATA" --out "$OUT" \
  --preset small --conditioning class --p-uncond 0.1 --dropout 0.1 \
  --num-train-timesteps 1000 --beta-schedule linear --prediction-type epsilon \
  --optimizer adam --weight-decay 0 "${SIZE[@]}" \
  --grad-clip 1 --ema-decay 0.9995 --no-hflip \
  --steps "${STEPS:-$DEFAULT_STEPS}" --save-every 1000 --sample-every 1000 --sample-steps 50 --guidance-scale 3 \
  --log-every 100 --dtype float32 \
  "$@"
