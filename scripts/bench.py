#!/usr/bin/env python
"""Thin wrapper around `minidiff bench` (same flags); see minidiff/bench.py.

    python scripts/bench.py --preset small --batch 64 --threads 2

With --threads N it also sets OPENBLAS_NUM_THREADS / OMP_NUM_THREADS / MKL_NUM_THREADS to N
before NumPy is imported, so NumPy's BLAS and PyTorch use the same number of threads even
without threadpoolctl.
"""

import os
import sys

argv = sys.argv[1:]
for i, a in enumerate(argv):
    n = a.split("=", 1)[1] if a.startswith("--threads=") else argv[i + 1] if a == "--threads" and i + 1 < len(argv) else None
    if n is not None and n.isdigit():
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = n

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # a checkout, not installed
from minidiff.bench import main  # noqa: E402  (after the thread variables are set)

if __name__ == "__main__":
    raise SystemExit(main(argv))
