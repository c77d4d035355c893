"""The clocks of `minidiff bench` (bench.py): timed calls, sides taking turns, peak host memory, BLAS threads,
and the printed table.

    median over repeats of  [sync; t0 = clock(); step(); sync; clock() - t0]   after warmup untimed steps

Every timed region ends with a device synchronization, so that a GPU's queued work is inside it.

Shape legend: none; these time calls, whatever their arrays.
"""

from __future__ import annotations

import os
import tracemalloc

COLUMNS = ("what", "device", "preset", "batch", "minidiff", "torch", "ratio")


def set_blas_threads(n: int | None) -> str:
    """Limit NumPy's BLAS to n threads (threadpoolctl when installed); return a note on what happened."""
    env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
    try:
        import threadpoolctl  # noqa: PLC0415  (optional)
    except ImportError:
        if n is None or env == str(n):
            return f"blas threads: {env or 'default (one per core)'}"
        return (f"blas threads: {env or 'default (one per core)'}, NOT {n}: install threadpoolctl, or start with "
                f"OPENBLAS_NUM_THREADS={n} (scripts/bench.py sets it for you)")
    if n is not None:
        set_blas_threads.limiter = threadpoolctl.threadpool_limits(n, user_api="blas")  # kept alive
    counts = sorted({info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"})
    return f"blas threads: {','.join(map(str, counts)) or '?'} (threadpoolctl)"


def times_ms(step, sync, warmup: int, repeats: int, timer) -> list[float]:
    """Milliseconds of each of `repeats` calls of step(), after warmup untimed calls; synchronized on both ends."""
    for _ in range(warmup):
        step()
        sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = timer()
        step()
        sync()  # the step's device work is finished before the clock stops
        times.append(1e3 * (timer() - t0))
    return times


def alternating_ms(sides, step: str, warmup: int, repeats: int, rounds: int, timer) -> list[list[list[float]]]:
    """times[side][round]: the ms of each timed step, the sides taking turns block by block, rounds times
    (each block after its own warm-up: the other side's thread pool may still be spinning down)."""
    times = [[] for _ in sides]
    for _ in range(rounds):
        for i, side in enumerate(sides):
            times[i].append(times_ms(getattr(side, step), side.sync, warmup, repeats, timer))
    return times


def cpu_peak_mb(fn) -> float:
    """tracemalloc peak (MB) of the allocations fn() makes on top of what was live before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return (tracemalloc.get_traced_memory()[1] - base) / 2**20
    finally:
        tracemalloc.stop()


def row(what, device, preset, batch, a, b) -> dict:
    """One printed row: minidiff's value a, torch's b (None: not measured) and their ratio."""
    ratio = a / b if a is not None and b else None
    return dict(what=what, device=device, preset=preset, batch=batch, minidiff=a, torch=b, ratio=ratio)


def format_rows(rows) -> str:
    """The rows as a fixed-width table, one line per measurement; '-' where a side was not measured."""
    f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'what':<24} {'device':<6} {'preset':<12} {'batch':>5} {'minidiff':>10} {'torch':>10} {'ratio':>6}"]
    for r in rows:
        lines.append(f"{r['what']:<24} {r['device']:<6} {r['preset']:<12} {r['batch']:>5} "
                     f"{f(r['minidiff'], '.1f'):>10} {f(r['torch'], '.1f'):>10} {f(r['ratio'], '.2f'):>6}")
    return "\n".join(lines)
