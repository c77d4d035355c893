#!/usr/bin/env bash
# One short GPU session for issue 6: the CuPy parity tests, then the bench beside PyTorch.
#
# usage: scripts/gpu_check.sh [OUT_DIR]      (OUT_DIR default: $OUT, else gpu_check/)
# Run from the repository root; minidiff need not be installed (the root goes on PYTHONPATH).
# Needs CuPy, a CUDA GPU, pytest + hypothesis, and for the ratios torch + diffusers. A machine
# that cannot download can get diffusers as wheels made beforehand where pip works:
#   python3 -m pip download --no-deps --only-binary=:all: diffusers==0.42.1 importlib_metadata -d .whl
# (.whl/ in .git/info/exclude, carried along); this script unpacks them from .whl/, when present, into
# a folder of its own on PYTHONPATH (the image's packages stay as they are; its huggingface_hub 1.33,
# safetensors, regex, requests and Pillow are diffusers 0.42.1's other needs, checked on Python 3.12).
# Writes into OUT_DIR (at most 8 files: the device tool brings back no more than that):
#   env.txt             GPU, driver, CuPy/torch versions (and the wheels' install log)
#   pytest.txt          pytest -m gpu (every CuPy-vs-NumPy float64 parity test) and the CuPy-only tests
#   bench.txt           minidiff bench's tables, one after another: small and ddpm-cifar10 at batch 128,
#                       float32, 3 alternating rounds (train step, sample step, peak memory, beside PyTorch);
#                       then small's steps
#                       with --reference (nn/'s array ops: no CUDA kernels of fast/); where a
#                       fast bench run fails (not a timeout), that preset's whole bench again with
#                       --reference beside PyTorch ("fallback")
#   bench_<preset>.json the rows of each preset (bench_<preset>_fallback.json for a fallback run)
#   profile_small.txt   cProfile of small's steps, by own time: which Python functions the host spends it in
# Each part has its own timeout (150 + 2 x 120 + 45 + 40 = 475 s at most) so that one hang cannot eat
# the session, and a device session (15 minutes, the machine's start included) keeps time to rerun
# what failed: PARTS="pytest bench unfused profile" (the default) picks the parts to run, e.g.
# PARTS=bench scripts/gpu_check.sh "$OUT" after a fix. The exit status is 0 when every part ran
# (read the files for the results).
set -uo pipefail
OUT_DIR=${1:-${OUT:-gpu_check}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
PARTS=" ${PARTS:-pytest bench unfused profile} "
SITE=${TMPDIR:-/tmp}/minidiff_gpu_check_site
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --upgrade --target "$SITE" .whl/*.whl > "$OUT_DIR/env.txt" 2>&1
fi
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  $PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__, 'cuda', cupy.cuda.runtime.runtimeGetVersion())" 2>&1
  $PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" 2>&1
} >> "$OUT_DIR/env.txt"
export PYTHONUNBUFFERED=1  # a part killed at its timeout still leaves what it printed
if [[ $PARTS == *" pytest "* ]]; then
  timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu -rs --durations=10 tests/ > "$OUT_DIR/pytest.txt" 2>&1
  echo "pytest exit $?" >> "$OUT_DIR/pytest.txt"
fi
BENCH="$OUT_DIR/bench.txt"
if [[ $PARTS == *" bench "* ]]; then
  for preset in small ddpm-cifar10; do
    echo "=== $preset, batch 128, fast ops (the CUDA kernels)" >> "$BENCH"
    timeout 120 $PY scripts/bench.py --device gpu --preset "$preset" --batch 128 --repeats 10 --warmup 3 --rounds 3 \
      --json "$OUT_DIR/bench_$preset.json" >> "$BENCH" 2>&1
    rc=$?
    echo "bench exit $rc" >> "$BENCH"
    if [ $rc -ne 0 ] && [ $rc -ne 124 ]; then  # failed, not timed out: maybe a fused kernel on the real CuPy;
      # the plain array ops then still give the ratios, in the same minute
      echo "=== $preset, batch 128, fallback: --reference" >> "$BENCH"
      timeout 90 $PY scripts/bench.py --reference --device gpu --preset "$preset" --batch 128 --repeats 10 \
        --warmup 3 --json "$OUT_DIR/bench_${preset}_fallback.json" >> "$BENCH" 2>&1
      echo "bench exit $?" >> "$BENCH"
    fi
  done
fi
if [[ $PARTS == *" unfused "* ]]; then  # the fast ops (CUDA kernels) against the reference's plain array ops
  echo "=== small, batch 128, --reference, no PyTorch" >> "$BENCH"
  timeout 45 $PY scripts/bench.py --reference --device gpu --preset small --batch 128 --repeats 10 --warmup 3 \
    --no-torch --no-memory >> "$BENCH" 2>&1
  echo "bench exit $?" >> "$BENCH"
fi
if [[ $PARTS == *" profile "* ]]; then  # host time by function: launch-bound if it is close to the step's wall time
  timeout 40 $PY -m cProfile -s tottime scripts/bench.py --device gpu --preset small --batch 128 --repeats 5 \
    --warmup 2 --no-torch --no-memory 2>&1 | head -n 60 > "$OUT_DIR/profile_small.txt"
fi
tail -n 5 "$OUT_DIR"/*.txt
