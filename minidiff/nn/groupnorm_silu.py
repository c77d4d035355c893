"""GroupNorm then SiLU, y = silu(GroupNorm(x)): the pair that opens both halves of every resnet block
and the U-Net's output head (diffusers' norm1 -> nonlinearity, norm2 -> nonlinearity, conv_norm_out ->
conv_act).

Shape legend: N batch, C channels, *S any number of spatial dims, G groups.

On NumPy (and on CuPy with MINIDIFF_FUSED=0) this is groupnorm_forward then silu_forward, and the
backward is silu_backward then groupnorm_backward: the same numbers as calling the two ops. On CuPy
the pair runs in GroupNorm's own kernels (groupnorm_cuda.py, silu=True): the forward's last kernel
applies SiLU as it writes, so h = GroupNorm(x) is never stored, and the backward recomputes h and
dL/dh = silu'(h) dy inside its two reductions and its last kernel. One launch fewer each way, and one
activation-sized array (h, which the SiLU cache holds) fewer per pair kept for the backward.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import get_array_module
from ._check import check_shape
from .activations import silu_backward, silu_forward
from .groupnorm import check_groupnorm_args, groupnorm_backward, groupnorm_forward
from ..fast.cuda.groupnorm import groupnorm_backward_cuda, groupnorm_forward_cuda


def groupnorm_silu_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = silu(h) = h * sigma(h),   h = gamma_c * (x - mean_g) / sqrt(var_g + eps) + beta_c

    Inputs:  as groupnorm_forward: x (N, C, *S) float32 or float64; gamma (C,), beta (C,) in x's
             dtype; num_groups G int dividing C; eps >= 0.
    Returns: y (N, C, *S) in x's dtype, and the cache for groupnorm_silu_backward.
    """
    xp = get_array_module(x)
    if xp is np or not backend.FUSED:
        h, norm = groupnorm_forward(x, gamma, beta, num_groups, eps)  # (N, C, *S)
        y, act = silu_forward(h)
        return y, (norm, act, None)
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    y, mean, rstd = groupnorm_forward_cuda(xp, x, gamma, beta, g, float(eps), silu=True)
    cache = (
        (x, gamma, mean, rstd, g),  # groupnorm_forward's cache
        None,  # no SiLU cache: h is recomputed in the kernels
        beta,  # (C,) the shift, to recompute h = (x - mean) rstd gamma + beta
    )
    return y, cache


def groupnorm_silu_backward(dy, cache):
    """dx, dgamma, dbeta of groupnorm_backward for the upstream gradient dh = dy * silu'(h),
    silu'(h) = sigma(h) (1 + h (1 - sigma(h))).

    Inputs:  dy (N, C, *S), the upstream gradient dL/dy; cache from groupnorm_silu_forward.
    Returns: dx (N, C, *S), dgamma (C,), dbeta (C,).
    """
    norm, act, beta = cache
    if act is not None:  # the two ops in turn
        return groupnorm_backward(silu_backward(dy, act), norm)
    x, gamma, mean, rstd, g = norm
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    return groupnorm_backward_cuda(get_array_module(dy, x), dy, x, gamma, mean, rstd, g, beta=beta)
