"""The ops table: which function runs each op that the reference path calls by name.

    y, cache = ops.conv2d_forward(x, w, b, stride, padding)       # the model never names a module
    dx, dw, db = ops.conv2d_backward(dy, cache)

REFERENCE runs nn/'s readable layers, diffusion/'s reverse steps and nn/optim.py's update rules:
what a learner reads. minidiff.fast builds tables with the same fields and signatures whose
functions are faster (Winograd, batch chunks, CUDA kernels, flat buffers, shards over the CPU
cores) and are tested against these, op by op, in float64. The caller picks the table (the
command line: fast by default, `--reference` for this one) and passes it down: the model, the
sampler and the optimizer call `ops.<name>` and never branch on speed.

Shape legend: the shapes of each op are in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..diffusion.sampler import ddim_step, ddpm_step
from .activations import silu_backward, silu_forward
from .attention import sdpa_backward, sdpa_forward
from .conv2d import conv2d_backward, conv2d_forward
from .dropout import dropout_backward, dropout_forward
from .embedding import embedding_backward, embedding_forward, timestep_embedding
from .groupnorm import groupnorm_backward, groupnorm_forward
from .groupnorm_silu import groupnorm_silu_backward, groupnorm_silu_forward
from .linear import linear_backward, linear_forward
from .optim import adam_update, clip_grad_norm, ema_update
from .resample import (downsample_backward, downsample_forward, upsample_nearest2x_backward,
                       upsample_nearest2x_forward)


def whole_batch(fn, batch, **shared):
    """(loss, grads) = fn(batch, **shared): the whole batch in one piece.

    The fast tables split batch's arrays by rows over the CPU cores, run fn on each piece and sum
    L = sum_k (N_k / N) L_k and its gradients; shared (weights, config, ...) goes whole to every piece."""
    return fn(batch, **shared)


def whole_forward(fn, batch, **shared):
    """out = fn(batch, **shared) (N, ...): the whole batch in one piece (the fast tables concatenate the pieces')."""
    return fn(batch, **shared)


def as_given(params):
    """The parameters as they are: a dict of arrays (the fast tables put them in one flat buffer)."""
    return params


@dataclass(frozen=True)
class Ops:
    """One function per op; the defaults are the reference ones (REFERENCE = Ops())."""

    # layers (nn/), forward/backward pairs
    conv2d_forward: Callable = conv2d_forward
    conv2d_backward: Callable = conv2d_backward
    downsample_forward: Callable = downsample_forward
    downsample_backward: Callable = downsample_backward
    upsample_nearest2x_forward: Callable = upsample_nearest2x_forward
    upsample_nearest2x_backward: Callable = upsample_nearest2x_backward
    groupnorm_forward: Callable = groupnorm_forward
    groupnorm_backward: Callable = groupnorm_backward
    groupnorm_silu_forward: Callable = groupnorm_silu_forward
    groupnorm_silu_backward: Callable = groupnorm_silu_backward
    silu_forward: Callable = silu_forward
    silu_backward: Callable = silu_backward
    linear_forward: Callable = linear_forward
    linear_backward: Callable = linear_backward
    sdpa_forward: Callable = sdpa_forward
    sdpa_backward: Callable = sdpa_backward
    embedding_forward: Callable = embedding_forward
    embedding_backward: Callable = embedding_backward
    dropout_forward: Callable = dropout_forward
    dropout_backward: Callable = dropout_backward
    timestep_embedding: Callable = timestep_embedding
    # the reverse process (diffusion/sampler.py): one step x_t -> x_prev
    ddpm_step: Callable = ddpm_step
    ddim_step: Callable = ddim_step
    # parameter updates (nn/optim.py), over whole dicts of parameters
    adam_update: Callable = adam_update
    ema_update: Callable = ema_update
    clip_grad_norm: Callable = clip_grad_norm
    # how a batch's gradient is computed and how parameters are held
    map_batch: Callable = whole_batch  # map_batch(fn, batch, **shared) -> fn's (loss, grads) for the whole batch
    map_forward: Callable = whole_forward  # map_forward(fn, batch, **shared) -> fn's output for the whole batch
    arrange_params: Callable = as_given  # arrange_params(params) -> the dict the optimizer updates
    name: str = "reference"


REFERENCE = Ops()
