"""Data parallelism over CPU cores: the batch split into shards, each shard's forward (and
backward) in its own thread, the gradients summed.

    L = sum_k (N_k / N) L_k,        dL/dtheta = sum_k (N_k / N) dL_k/dtheta

L_k is the mean loss over shard k's N_k rows, so L is the mean over the whole batch. The split
changes nothing but float rounding: every op of the U-Net acts on each sample alone (convs,
GroupNorm, attention, the time embedding), and the dropout masks of a shard are its rows of the
masks drawn for the whole batch (unet_forward(rows=...)).

Threads or processes (shards=): NumPy releases the GIL inside its loops and BLAS calls, so two
shards in threads keep two cores busy on the big ops; but a step is also thousands of small ops
whose Python and dispatch overhead holds the GIL, and there the threads queue for it. In worker
processes (shard_processes.py) each shard has its own GIL and gives the same numbers, bit for bit;
the command line runs them there by default (--shards processes), a library call in threads unless
asked. While the shards run, BLAS gets cores // shards threads each (threadpoolctl), one each on
2 cores: on this network's GEMMs OpenBLAS's own threads cost more than they gain there
(docs/performance.md). Measured on 2 cores only; the auto setting (one shard per core, at most 4)
is a guess beyond that. A GPU is one device: there workers is always 1.

Shape legend: N batch, N_k rows of shard k, C H W image, S prompt tokens.
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import flat
from . import shard_processes
from ...backend import get_array_module
from ...diffusion.loss import diffusion_loss
from ...model.unet import unet_backward, unet_forward

_POOLS: dict[int, ThreadPoolExecutor] = {}
# While shards run, a thread that holds the GIL through a run of small NumPy ops is asked to hand it
# over after 1 ms instead of CPython's 5 ms, so a shard waiting to start its next big op (which
# releases the GIL) is not stalled: 7 % (training step) to 14 % (sampling step) faster on 2 cores.
SWITCH_INTERVAL = 0.001
# Where the shards run (the shards argument, --shards on the command line): "threads", here, or
# "processes", in worker processes (shard_processes.py: no GIL shared between the shards, the same numbers).
SHARD_MODES = ("threads", "processes")


def check_shards(shards) -> str:
    """Return shards, or raise ValueError naming --shards unless it is 'threads' or 'processes'."""
    if shards not in SHARD_MODES:
        raise ValueError(f"--shards must be one of {list(SHARD_MODES)}, got {shards!r}")
    return shards


def _in_processes(bounds, xp, shards: str) -> bool:
    """Whether these shards go to worker processes (several shards, NumPy, shards='processes')."""
    return check_shards(shards) == "processes" and len(bounds) > 1 and xp is np


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def resolve_workers(workers, device: str = "cpu") -> int:
    """workers: 0 = auto (the available cores, at most 4, on a CPU; 1 on a GPU), or an int >= 1."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 0:
        raise ValueError(f"workers (--threads) must be an int >= 0 (0 = one per CPU core, at most 4), got {workers!r}")
    if device == "gpu":
        return 1
    return min(available_cores(), 4) if workers == 0 else int(workers)


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


def map_shards(fn, n: int, workers: int) -> list:
    """[fn(start, stop) for each shard of n rows], shard k run in thread k; results in shard order."""
    bounds = shard_bounds(n, workers)
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


def _rows(a, start, stop):
    return None if a is None else a[start:stop]


def loss_and_grads(params, config, schedule, x_t, x0, noise, t, class_labels=None, context=None,
                   prediction_type="epsilon", snr_gamma=None, rng=None, workers: int = 1, shards: str = "threads"):
    """L = sum_k (N_k / N) L_k and dL/dtheta = sum_k (N_k / N) dL_k/dtheta over the shards of the batch.

    Inputs: x_t, x0, noise (N, C, H, W); t (N,); class_labels (N,) or None; context (N, S) or None;
            rng: the host generator of the dropout masks (advanced as one unsplit forward would);
            shards: "threads" or "processes", where the shards run (the same numbers either way).
    Returns (loss, grads): a 0-d array on x_t's backend and {name: dL/dparam}, a flat.FlatDict
    (one buffer) when params is one.
    With workers = 1 this is unet_forward + diffusion_loss + unet_backward, op for op.
    """
    n = x_t.shape[0]
    bounds = shard_bounds(n, workers)
    if _in_processes(bounds, get_array_module(x_t), shards):
        return shard_processes.loss_and_grads(params, config, schedule, x_t, x0, noise, t, class_labels, context,
                                              prediction_type, snr_gamma, rng, bounds,
                                              max(1, available_cores() // len(bounds)))
    rngs = [rng] if len(bounds) == 1 else [copy.deepcopy(rng) for _ in bounds]  # same seeds in every shard

    def shard(start, stop):
        k = bounds.index((start, stop))
        out, cache = unet_forward(params, config, x_t[start:stop], t[start:stop],
                                  class_labels=_rows(class_labels, start, stop), context=_rows(context, start, stop),
                                  train=True, rng=rngs[k], rows=None if len(bounds) == 1 else (start, stop, n))
        loss, dout = diffusion_loss(schedule, out, x0[start:stop], noise[start:stop], t[start:stop],
                                    prediction_type, snr_gamma)
        if len(bounds) > 1:  # forward: L = sum_k (N_k / N) L_k
            weight = (stop - start) / n
            loss = loss * weight
            dout *= weight  # in place: diffusion_loss returns a new array
        grads, _ = unet_backward(dout, cache)
        return loss, flat.gather(grads, like=params)  # one buffer when params has one (flat.FlatDict)

    results = map_shards(shard, n, workers)
    if len(bounds) > 1 and rng is not None:
        rng.bit_generator.state = rngs[0].bit_generator.state  # as if one forward had drawn the seeds
    loss, grads = results[0]
    for part_loss, part_grads in results[1:]:
        loss = loss + part_loss
        summed = flat.buffers(grads, part_grads)
        for g, part in flat.pieces(summed) if summed else [(g, part_grads[key]) for key, g in grads.items()]:
            g += part
    return loss, grads


def forward(params, config, x, t, class_labels=None, context=None, workers: int = 1, shards: str = "threads"):
    """eps = UNet(x, t[, y][, prompt]) (inference, no dropout), the batch split over worker threads or processes.

    Inputs as unet_forward's; t a scalar or (N,); shards as loss_and_grads's. Returns eps (N, C_out, H, W)
    on x's backend.
    """
    n = x.shape[0]
    xp = get_array_module(x)
    t = xp.asarray(t)
    bounds = shard_bounds(n, workers)
    if len(bounds) == 1:
        return unet_forward(params, config, x, t, class_labels=class_labels, context=context, for_backward=False)[0]
    if _in_processes(bounds, xp, shards):
        return shard_processes.forward(params, config, x, t, class_labels, context, bounds,
                                       max(1, available_cores() // len(bounds)))

    def shard(start, stop):
        ts = t if t.ndim == 0 else t[start:stop]
        return unet_forward(params, config, x[start:stop], ts, class_labels=_rows(class_labels, start, stop),
                            context=_rows(context, start, stop), for_backward=False)[0]

    return xp.concatenate(map_shards(shard, n, workers), axis=0)
