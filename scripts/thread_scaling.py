"""How well two threads scale on this machine for the kinds of work a minidiff step does.

Runs each job once alone and then twice at once in two threads (BLAS at one thread), and prints
the speed-up 2 * t(one) / t(two in parallel): 2.0 is perfect, 1.0 no gain, below 1.0 a loss.
Used for docs/performance.md ("Threads"). Run: python scripts/thread_scaling.py
"""

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits


def gemm():  # like Winograd's 16 batched GEMMs
    a, b = np.random.rand(16, 1024, 64).astype(np.float32), np.random.rand(16, 64, 64).astype(np.float32)
    def job():
        for _ in range(200):
            a @ b
    return job


def elementwise(size):  # like SiLU's exp, in cache (256 K floats) or not (4 M floats)
    x = np.random.rand(size).astype(np.float32)
    def job():
        for _ in range(int(2e8 / size)):
            np.exp(x)
    return job


def small_ops():  # like GroupNorm's statistics or the time-embedding MLP: the GIL is held throughout
    x = np.random.rand(1000).astype(np.float32)
    def job():
        for _ in range(20000):
            x * 2.0
    return job


def main():
    threadpool_limits(1, user_api="blas")
    pool = ThreadPoolExecutor(2)
    jobs = [("batched GEMM", gemm), ("exp, 256 K floats", lambda: elementwise(256 * 1024)),
            ("exp, 4 M floats", lambda: elementwise(4 * 1024 * 1024)), ("small ops, 1000 floats", small_ops)]
    for name, make in jobs:
        f1, f2 = make(), make()
        f1()  # warm-up
        t = time.perf_counter()
        f1()
        one = time.perf_counter() - t
        t = time.perf_counter()
        for fut in [pool.submit(f1), pool.submit(f2)]:
            fut.result()
        two = time.perf_counter() - t
        print(f"{name:<24} one job {one * 1e3:6.0f} ms, two jobs in two threads {two * 1e3:6.0f} ms: "
              f"scaling {2 * one / two:.2f}x")


if __name__ == "__main__":
    main()
