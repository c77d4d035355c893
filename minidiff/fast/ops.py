"""The fast ops tables: nn/ops.py's Ops with every field that has a faster version replaced.

    ops = fast_ops(workers=2, shards="processes")   # what `minidiff train` uses unless --reference
    unet_forward(params, config, x, t, ops=ops)

Each fast function has the reference function's signature and returns the same numbers, exactly
where the arithmetic is the same and within a stated tolerance where it is not (Winograd); the
tests under tests/fast/ check every one against its reference op in float64. The functions pick
their path from their arrays: NumPy runs the CPU code (fast/cpu/), CuPy the CUDA kernels (fast/cuda/).

Shape legend: none; see each op's module.
"""

from __future__ import annotations

import dataclasses

from ..nn.ops import REFERENCE, Ops
from . import conv
from . import norm
from . import flat
from . import optim
from . import sampler
from .cpu.shards import Shards

# Filled in as the fast ops land (each module owns its functions):
#   fast/conv.py      conv2d_forward / conv2d_backward / downsample_forward / downsample_backward
#   fast/norm.py      groupnorm_*, groupnorm_silu_*, silu_* (CUDA kernels on CuPy; the CPU fold on NumPy)
#   fast/sampler.py   ddpm_step / ddim_step (one kernel per step on CuPy)
#   fast/optim.py     adam_update / ema_update / clip_grad_norm (one update of the flat buffers; one kernel on CuPy)
#   fast/flat.py      flatten (arrange_params)
#   fast/cpu/shards.py  map_batch over worker threads or processes
FAST = dataclasses.replace(
    REFERENCE,
    conv2d_forward=conv.conv2d_forward, conv2d_backward=conv.conv2d_backward,
    downsample_forward=conv.downsample_forward, downsample_backward=conv.downsample_backward,
    groupnorm_forward=norm.groupnorm_forward, groupnorm_backward=norm.groupnorm_backward,
    groupnorm_silu_forward=norm.groupnorm_silu_forward, groupnorm_silu_backward=norm.groupnorm_silu_backward,
    silu_forward=norm.silu_forward, silu_backward=norm.silu_backward,
    ddpm_step=sampler.ddpm_step, ddim_step=sampler.ddim_step,
    adam_update=optim.adam_update, ema_update=optim.ema_update, clip_grad_norm=optim.clip_grad_norm,
    map_batch=Shards(1).map_batch, map_forward=Shards(1).map_forward, arrange_params=flat.flatten,
    name="fast")


def fast_ops(workers: int = 1, shards: str = "threads") -> Ops:
    """FAST, with the batch split over `workers` CPU shards in threads or processes (workers = 1: one piece).

    workers >= 1 (resolve --threads 0 with fast.cpu.shards.resolve_workers); shards: 'threads' or
    'processes' (a ValueError naming --shards otherwise). The workers run FAST on their shards."""
    split = Shards(workers, shards)
    return dataclasses.replace(FAST, map_batch=split.map_batch, map_forward=split.map_forward)
