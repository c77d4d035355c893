"""Group normalization (Wu & He 2018), PyTorch's F.group_norm, with its hand-written backward.

Shape legend: N batch, C channels, *S any number of spatial dims (none, (H, W), ...),
G groups, Cg = C / G channels per group, L = prod(S) positions, M = Cg * L elements
normalized together.

The backward follows llm.c's layernorm (doc/layernorm/layernorm.md): the forward caches the
per-group mean and rstd = 1 / sqrt(var + eps) only, and the backward recomputes the centered
input x - mean from x. x is cached as a reference to the caller's array (which the network
keeps anyway), so caching xhat as well would cost one more activation-sized array per layer
to save one subtract.

Speed (NumPy is memory-bound here): both passes fold everything per group or per channel
into small (N, G) and (N, C) coefficients and touch the activation-sized arrays only in a few
whole-array ops, written in place, with no product temporaries (_dot_last). Sums of products
use x - mean, never x itself: with a large group mean, E[x^2] - E[x]^2 or
sum(dy * x) - mean * sum(dy) would cancel in float32. On CuPy the same formulas run in fewer,
fused kernels (groupnorm_cuda.py; MINIDIFF_FUSED=0 runs the code below there too).
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..backend import get_array_module
from ._check import check_float, check_same_backend, check_shape
from ..fast.cuda.groupnorm import groupnorm_backward_cuda, groupnorm_forward_cuda


def _check_num_groups(num_groups, channels: int) -> int:
    """Raise ValueError unless num_groups is an int in [1, C] that divides C."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise ValueError(f"num_groups must be an int dividing C = {channels}, got {num_groups!r}")
    g = int(num_groups)
    if g < 1 or g > channels or channels % g != 0:
        raise ValueError(f"num_groups must be an int in [1, C] dividing C = {channels}, got {g}")
    return g


def _dot_last(u, v):
    """sum_k u[..., k] * v[..., k]   (..., K), (..., K) -> (...)

    A batched matmul of (..., 1, K) by (..., K, 1): BLAS dot products on NumPy (cuBLAS on CuPy),
    with no (..., K) temporary. Faster than xp.einsum("...k,...k->...") and, in float32, as
    accurate as NumPy's pairwise sum (einsum accumulates serially: ~7x the error at K = 8192).
    """
    return (u[..., None, :] @ v[..., :, None])[..., 0, 0]


def check_groupnorm_args(x, gamma, beta, num_groups, eps) -> int:
    """Raise ValueError naming the argument unless x (N, C, *S) is float, gamma and beta are (C,) in
    x's dtype on x's backend, num_groups divides C and eps is finite >= 0; return G."""
    check_same_backend(x=x, gamma=gamma, beta=beta)
    check_float("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) (at least 2 dims), got shape {tuple(x.shape)}")
    g = _check_num_groups(num_groups, x.shape[1])
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_float(name, p)
        check_shape(name, p, (x.shape[1],), "(C,)")
        if p.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {p.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return g


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = gamma_c * (x - mean_g) / sqrt(var_g + eps) + beta_c   (PyTorch F.group_norm)

    mean_g and the biased variance var_g = mean_g((x - mean_g)^2) are taken over the M elements
    of each (sample, group): the Cg channels of group g and all spatial positions.

    Inputs:  x (N, C, *S) float32 or float64 (S may be empty, e.g. x (N, C));
             gamma (C,), beta (C,) in x's dtype; num_groups G int dividing C; eps >= 0.
    Returns: y (N, C, *S) in x's dtype, and the cache for groupnorm_backward.
    """
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    n, c = x.shape[:2]
    xp = get_array_module(x)
    if xp is not np and backend.FUSED:  # the same formulas in 3 CuPy kernels (groupnorm_cuda.py)
        y, mean, rstd = groupnorm_forward_cuda(xp, x, gamma, beta, g, float(eps))
        return y, (x, gamma, mean, rstd, g)

    xg = x.reshape(n, g, -1)  # (N, G, M)
    mean = xg.mean(axis=2)  # (N, G)
    y = xg - mean[:, :, None]  # (N, G, M) centered x, in the buffer that becomes y
    var = _dot_last(y, y) / y.shape[2]  # (N, G) biased, as PyTorch; two-pass
    rstd = 1.0 / xp.sqrt(var + float(eps))  # (N, G)
    # y = (x - mean) * rstd * gamma + beta = (x - mean) * a + beta, a the folded scale
    a = (rstd[:, :, None] * gamma.reshape(g, -1)).reshape(n, c, 1)  # (N, C, 1)
    y3 = y.reshape(n, c, -1)  # (N, C, L) a view of y
    y3 *= a
    y3 += beta.reshape(1, c, 1)
    cache = (
        x,  # (N, C, *S) the input, a reference: x - mean is recomputed from it in the backward
        gamma,  # (C,) the scale: dxhat = dy * gamma needs it (beta is not needed)
        mean,  # (N, G) per-group mean, to recompute x - mean without a second reduction
        rstd,  # (N, G) per-group 1 / sqrt(var + eps), for a, k1, k0 and dgamma
        g,  # G, the number of groups
    )
    return y.reshape(x.shape), cache


def groupnorm_backward(dy, cache):
    """dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),  dxhat = dy * gamma_c

    dgamma_c = sum_{N, S} dy * xhat,   dbeta_c = sum_{N, S} dy.

    Computed from two sums per (sample, channel), s1 = sum_S dy and s2 = sum_S dy * (x - mean).
    With xhat = (x - mean) * rstd, the group sums of the formula above are
        sum_g dxhat        = sum_{c in g} gamma_c s1 =: A1             (N, G)
        sum_g dxhat * xhat = rstd * sum_{c in g} gamma_c s2 =: rstd A2  (N, G)
    so that, expanding the bracket,
        dx = dy * (rstd gamma_c) + (x - mean) * (-rstd^3 A2 / M) + (-rstd A1 / M)
           = dy * a + (x - mean) * k1 + k0,   a (N, C) as in the forward, k1, k0 (N, G),
        dgamma_c = sum_N rstd s2,   dbeta_c = sum_N s1.

    Inputs:  dy (N, C, *S), the upstream gradient dL/dy; cache from groupnorm_forward.
    Returns: dx (N, C, *S), dgamma (C,), dbeta (C,).
    """
    x, gamma, mean, rstd, g = cache
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    xp = get_array_module(dy, x)
    if xp is not np and backend.FUSED:  # the same formulas in 8 CuPy kernels (groupnorm_cuda.py)
        return groupnorm_backward_cuda(xp, dy, x, gamma, mean, rstd, g)
    n, c = x.shape[:2]
    xc = x.reshape(n, g, -1) - mean[:, :, None]  # (N, G, M) recomputed, as in the forward
    m = xc.shape[2]
    xc3 = xc.reshape(n, c, -1)  # (N, C, L) a view of xc
    dy3 = dy.reshape(n, c, -1)  # (N, C, L)
    s1 = dy3.sum(axis=2)  # (N, C) sum_S dy
    s2 = _dot_last(dy3, xc3)  # (N, C) sum_S dy * (x - mean)
    rstd_c = xp.repeat(rstd, c // g, axis=1)  # (N, C) rstd of each channel's group
    # forward: y = xhat * gamma + beta, applied as y = (x - mean) * a + beta
    dbeta = s1.sum(axis=0)  # (C,)
    dgamma = (s2 * rstd_c).sum(axis=0)  # (C,) sum_{N, S} dy * (x - mean) * rstd
    # forward: xhat = (x - mean) * rstd, with mean and rstd functions of every x in the group
    a1 = (s1 * gamma).reshape(n, g, -1).sum(axis=2)  # (N, G) sum_g dxhat
    a2 = (s2 * gamma).reshape(n, g, -1).sum(axis=2)  # (N, G) sum_g dxhat * (x - mean)
    k1 = -(rstd * rstd * rstd) * a2 / m  # (N, G)
    k0 = -rstd * a1 / m  # (N, G)
    xc *= k1[:, :, None]
    xc += k0[:, :, None]  # (N, G, M) now (x - mean) * k1 + k0
    dx = dy3 * (rstd_c * gamma)[:, :, None]  # (N, C, L) dy * a, a = rstd * gamma
    dx += xc3
    return dx.reshape(x.shape), dgamma, dbeta
