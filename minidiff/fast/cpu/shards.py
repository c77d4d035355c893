"""Data parallelism over CPU cores: the fast tables' map_batch and map_forward. The batch is split
into shards by rows, fn runs on each shard in its own thread (or worker process), and the results
are joined:

    map_batch:    L = sum_k (N_k / N) L_k,   dL/dtheta = sum_k (N_k / N) dL_k/dtheta,   (L_k, dL_k) = fn(shard_k)
    map_forward:  out = concat_k fn(shard_k)

L_k is the mean loss over shard k's N_k rows, so L is the mean over the whole batch. The split
changes nothing but float rounding: every op of the U-Net acts on each sample alone (convs,
GroupNorm, attention, the time embedding), and the batch carries its dropout masks, so a shard
gets its rows of the whole batch's masks, which it draws itself (model/dropout.py's DropoutMasks.take_rows:
in a worker process, in parallel, and only a few numbers travel). What is split (training/accumulate.py's
rows): every array of the batch dict with a batch axis, the dicts in it entry by entry, the dropout masks;
0-d arrays, numbers and None go whole to every shard, as do the `shared` keyword arguments (weights, config).

Threads or processes (Shards.mode): NumPy releases the GIL inside its loops and BLAS calls, so two
shards in threads keep two cores busy on the big ops; but a step is also thousands of small ops
whose Python and dispatch overhead holds the GIL, and there the threads queue for it. In worker
processes (shard_processes.py) each shard has its own GIL and gives the same numbers, bit for bit;
the command line runs them there by default (--shards processes), a library call in threads unless
asked. While the shards run, BLAS gets cores // shards threads each (threadpoolctl), one each on
2 cores: on this network's GEMMs OpenBLAS's own threads cost more than they gain there
(docs/performance.md). Measured on 2 cores only; the auto setting (one shard per core, at most 4)
is a guess beyond that. A GPU is one device: a batch of CuPy arrays runs in one piece.

Shape legend: N batch, N_k rows of shard k, P the flat buffer's length.
"""

from __future__ import annotations

import contextlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .. import flat
from . import shard_processes
from ...backend import get_array_module
from ...training.accumulate import rows
from ...training.config import SHARD_MODES, check_shards, check_threads  # noqa: F401  (SHARD_MODES: re-exported)

_POOLS: dict[int, ThreadPoolExecutor] = {}
# While shards run, a thread that holds the GIL through a run of small NumPy ops is asked to hand it
# over after 1 ms instead of CPython's 5 ms, so a shard waiting to start its next big op (which
# releases the GIL) is not stalled: 7 % (training step) to 14 % (sampling step) faster on 2 cores.
SWITCH_INTERVAL = 0.001


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers, device: str = "cpu") -> int:
    """workers: 0 = auto (the available cores, at most 4, on a CPU; 1 on a GPU), or an int >= 1."""
    workers = check_threads(workers)
    if device == "gpu":
        return 1
    return min(available_cores(), 4) if workers == 0 else workers


def shard_bounds(n: int, workers: int) -> list[tuple[int, int]]:
    """[(start, stop), ...]: n rows in min(workers, n) contiguous shards whose sizes differ by at most 1."""
    k = max(1, min(int(workers), int(n)))
    edges = [n * i // k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


_BLAS = []  # the threadpoolctl controller, made once (inspecting the loaded libraries costs ~0.3 ms)


def _blas_threads(n: int):
    """A context that holds BLAS to n threads per caller while the shards run (no-op without threadpoolctl)."""
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController  # noqa: PLC0415  (a dependency; tolerated missing)
        except ImportError:
            return contextlib.nullcontext()
        _BLAS.append(ThreadpoolController())
    return _BLAS[0].limit(limits=n, user_api="blas")


def map_shards(fn, bounds: list) -> list:
    """[fn(start, stop) for each (start, stop) in bounds], shard k run in thread k; results in shard order."""
    if len(bounds) == 1:
        return [fn(*bounds[0])]
    pool = _POOLS.get(len(bounds))
    if pool is None:
        pool = _POOLS[len(bounds)] = ThreadPoolExecutor(len(bounds), thread_name_prefix="minidiff-shard")
    interval = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        with _blas_threads(max(1, available_cores() // len(bounds))):  # 2 cores, 2 shards: 1 each
            futures = [pool.submit(fn, start, stop) for start, stop in bounds]
            return [f.result() for f in futures]
    finally:
        sys.setswitchinterval(interval)


# ----------------------------------------------------------------------------- batches


def _arrays(batch):
    """The arrays in batch (a dict of arrays, dicts of arrays, dropout masks, numbers and None), depth first;
    the dropout masks (model/dropout.py's DropoutMasks) hold no arrays until a block reads them."""
    if isinstance(batch, dict):
        for value in batch.values():
            yield from _arrays(value)
    elif hasattr(batch, "ndim"):
        yield batch


def _row_counts(batch):
    """The number of rows of each part of batch that has a batch axis, depth first."""
    if isinstance(batch, dict):
        for value in batch.values():
            yield from _row_counts(value)
    elif hasattr(batch, "take_rows"):
        yield batch.num_rows
    elif getattr(batch, "ndim", 0) > 0:
        yield int(batch.shape[0])


def batch_rows(batch: dict) -> int:
    """N: the rows of batch's arrays (and dropout masks) with a batch axis; ValueError unless they all agree."""
    sizes = set(_row_counts(batch))
    if len(sizes) != 1:
        raise ValueError(f"the batch's arrays must all have the same number of rows (N, ...), got {sorted(sizes)}")
    return sizes.pop()


def weighted_sum(parts: list, bounds: list):
    """(L, grads) = sum_k (N_k / N) (L_k, grads_k) over the shards' (L_k, grads_k), in shard order.

    grads_0 is summed into in place (each shard's grads are new arrays); on flat buffers one pass per
    piece of the buffer. Threads and processes both sum here: the same numbers, bit for bit."""
    n = bounds[-1][1]
    loss, total = None, parts[0][1]
    for k, ((start, stop), (part_loss, grads)) in enumerate(zip(bounds, parts)):
        w = (stop - start) / n
        bufs = flat.buffers(total, grads)
        pairs = flat.pieces(bufs) if bufs else [(total[key], grads[key]) for key in total]
        for g, part in pairs:
            if k == 0:
                g *= w
            else:
                g += part * w
        loss = part_loss * w if k == 0 else loss + part_loss * w
    return loss, total


# ----------------------------------------------------------------------------- the ops


@dataclass(frozen=True)
class Shards:
    """The batch in `workers` shards, run in threads or worker processes (mode); the fast tables'
    map_batch and map_forward (fast_ops(workers, mode)). workers = 1: one piece, in this thread."""

    workers: int = 1
    mode: str = "threads"

    def __post_init__(self):
        if check_threads(self.workers) < 1:
            raise ValueError(f"workers (--threads) must be >= 1 here (resolve 0 with resolve_workers), got 0")
        check_shards(self.mode)

    def _bounds(self, batch) -> tuple[list, bool]:
        """(the shards' (start, stop), whether they run in worker processes)."""
        n = batch_rows(batch)
        if get_array_module(*_arrays(batch)) is not np:
            return [(0, n)], False  # a GPU: one device, one piece
        bounds = shard_bounds(n, self.workers)
        return bounds, self.mode == "processes" and len(bounds) > 1

    def map_batch(self, fn, batch: dict, **shared):
        """(L, grads) = sum_k (N_k / N) fn(shard_k, **shared), fn returning (L_k, {name: dL_k/dparam}).

        When shared["params"] is a flat.FlatDict, grads is one too (the optimizer updates one buffer).
        In processes fn must be a module-level function (the workers import it by name) and shared
        must hold params and travel as JSON and arrays (shard_messages.encode)."""
        bounds, in_processes = self._bounds(batch)
        params = shared.get("params")
        if in_processes:
            parts = shard_processes.map_batch(fn, [rows(batch, *b) for b in bounds], shared, self._blas(bounds))
        else:
            def shard(start, stop):
                loss, grads = fn(batch if len(bounds) == 1 else rows(batch, start, stop), **shared)
                return loss, flat.gather(grads, like=params)  # one buffer when params has one

            parts = map_shards(shard, bounds)
        return parts[0] if len(parts) == 1 else weighted_sum(parts, bounds)

    def map_forward(self, fn, batch: dict, **shared):
        """out = concat_k fn(shard_k, **shared) along the batch axis (one piece: fn(batch, **shared))."""
        bounds, in_processes = self._bounds(batch)
        if in_processes:
            pieces = [rows(batch, *b) for b in bounds]
            return np.concatenate(shard_processes.map_forward(fn, pieces, shared, self._blas(bounds)), axis=0)
        if len(bounds) == 1:
            return fn(batch, **shared)
        return np.concatenate(map_shards(lambda start, stop: fn(rows(batch, start, stop), **shared), bounds), axis=0)

    @staticmethod
    def _blas(bounds) -> int:
        return max(1, available_cores() // len(bounds))
