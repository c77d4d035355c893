"""GroupNorm, SiLU and GroupNorm + SiLU for the FAST ops table: nn/'s signatures, the path picked from the arrays.

    NumPy  GroupNorm: the CPU fold (fast/cpu/groupnorm.py: forward ~1.8x, backward ~2.3x the reference's
           speed at (64, 128, 16, 16), G = 32, float32, one thread); SiLU: the reference's arithmetic
           with sigma(x) kept from the forward (fast/cpu/activations.py, bit for bit); GroupNorm + SiLU:
           the two in turn, dh overwritten by dx in the backward.
    CuPy   the CUDA kernels: GroupNorm in 2 launches forward and 8 backward (fast/cuda/groupnorm.py),
           SiLU in one each way (fast/cuda/silu.py), GroupNorm + SiLU in GroupNorm's launches with
           SiLU applied inside them, h = GroupNorm(x) never stored.

Caches: groupnorm_* keep the reference's cache (either backward takes either forward's cache); silu_*
on NumPy (x, sigma(x)), on CuPy the reference's (x,) (silu_backward takes either). groupnorm_silu_forward
returns (norm, act, beta): on NumPy (norm, (h, sigma(h)), None); on CuPy (norm, None, beta), no SiLU cache
since the kernels recompute h from beta. Each backward takes its own forward's cache. tests/fast/test_norm.py checks every op against nn/'s.

Shape legend: N batch, C channels, *S any number of spatial dims, G groups; SiLU: any shape.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn import activations
from ..nn._check import check_float, check_shape
from ..nn.groupnorm import check_groupnorm_args
from .cpu import activations as activations_cpu
from .cpu import groupnorm as groupnorm_cpu
from .cuda.groupnorm import groupnorm_backward_cuda, groupnorm_forward_cuda
from .cuda.silu import silu_backward_cuda, silu_forward_cuda


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = gamma_c * (x - mean_g) / sqrt(var_g + eps) + beta_c, as nn.groupnorm.groupnorm_forward."""
    xp = get_array_module(x)
    if xp is np:
        return groupnorm_cpu.groupnorm_forward(x, gamma, beta, num_groups, eps)
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    y, mean, rstd = groupnorm_forward_cuda(xp, x, gamma, beta, g, float(eps))
    return y, (x, gamma, mean, rstd, g)  # nn/groupnorm.py's cache


def groupnorm_backward(dy, cache):
    """dx = rstd (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), dgamma, dbeta, as nn.groupnorm.groupnorm_backward."""
    x, gamma, mean, rstd, g = cache
    xp = get_array_module(dy, x)
    if xp is np:
        return groupnorm_cpu.groupnorm_backward(dy, cache)
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    return groupnorm_backward_cuda(xp, dy, x, gamma, mean, rstd, g)


def silu_forward(x):
    """y = x * sigma(x), as nn.activations.silu_forward."""
    xp = get_array_module(x)
    if xp is np:
        return activations_cpu.silu_forward(x)
    check_float("x", x)
    return silu_forward_cuda(xp, x), (x,)  # nn/activations.py's cache


def silu_backward(dy, cache):
    """dx = dy * sigma(x) * (1 + x * (1 - sigma(x))), as nn.activations.silu_backward."""
    x = cache[0]
    xp = get_array_module(dy, x)
    if xp is np:  # sigma(x) kept by the forward, or the reference's cache (x,)
        return activations_cpu.silu_backward(dy, cache) if len(cache) == 2 else activations.silu_backward(dy, cache)
    check_shape("dy", dy, x.shape, "(...) = x.shape")
    return silu_backward_cuda(xp, x, dy)


def groupnorm_silu_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = silu(GroupNorm(x)), as nn.groupnorm_silu.groupnorm_silu_forward."""
    xp = get_array_module(x)
    if xp is np:
        return activations_cpu.groupnorm_silu_forward(x, gamma, beta, num_groups, eps)
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    y, mean, rstd = groupnorm_forward_cuda(xp, x, gamma, beta, g, float(eps), silu=True)
    cache = (
        (x, gamma, mean, rstd, g),  # groupnorm_forward's cache
        None,  # no SiLU cache: h is recomputed in the kernels
        beta,  # (C,) the shift, to recompute h = (x - mean) rstd gamma + beta
    )
    return y, cache


def groupnorm_silu_backward(dy, cache):
    """groupnorm_backward of dh = dy * silu'(h), as nn.groupnorm_silu.groupnorm_silu_backward."""
    norm, act, beta = cache
    if act is not None:  # NumPy: the two ops in turn
        return activations_cpu.groupnorm_silu_backward(dy, cache)
    x, gamma, mean, rstd, g = norm
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    return groupnorm_backward_cuda(get_array_module(dy, x), dy, x, gamma, mean, rstd, g, beta=beta)
