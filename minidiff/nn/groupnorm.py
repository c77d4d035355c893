"""Group normalization (Wu & He 2018), PyTorch's F.group_norm, with its hand-written backward.

Shape legend: N batch, C channels, *S any number of spatial dims (none, (H, W), ...),
G groups, Cg = C / G channels per group, M = Cg * prod(S) elements normalized together.

The backward follows llm.c's layernorm (doc/layernorm/layernorm.md): the forward caches the
per-group mean and rstd = 1 / sqrt(var + eps) only, and the backward recomputes the normalized
input xhat = (x - mean) * rstd from x. x is cached as a reference to the caller's array (which
the network keeps anyway), so caching xhat as well would cost one more activation-sized array
per layer to save one subtract and one multiply.
"""

from __future__ import annotations

import numbers

from ..backend import get_array_module
from ._check import check_float, check_same_backend, check_shape


def _check_num_groups(num_groups, channels: int) -> int:
    """Raise ValueError unless num_groups is an int in [1, C] that divides C."""
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise ValueError(f"num_groups must be an int dividing C = {channels}, got {num_groups!r}")
    g = int(num_groups)
    if g < 1 or g > channels or channels % g != 0:
        raise ValueError(f"num_groups must be an int in [1, C] dividing C = {channels}, got {g}")
    return g


def _channel_shape(x) -> tuple:
    """(1, C, 1, ..., 1): the shape that broadcasts a (C,) parameter over N and the spatial dims."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = gamma_c * (x - mean_g) / sqrt(var_g + eps) + beta_c   (PyTorch F.group_norm)

    mean_g and the biased variance var_g = mean_g((x - mean_g)^2) are taken over the M elements
    of each (sample, group): the Cg channels of group g and all spatial positions.

    Inputs:  x (N, C, *S) float32 or float64 (S may be empty, e.g. x (N, C));
             gamma (C,), beta (C,) in x's dtype; num_groups G int dividing C; eps >= 0.
    Returns: y (N, C, *S) in x's dtype, and the cache for groupnorm_backward.
    """
    check_same_backend(x=x, gamma=gamma, beta=beta)
    check_float("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (N, C, *spatial) (at least 2 dims), got shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    g = _check_num_groups(num_groups, c)
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_float(name, p)
        check_shape(name, p, (c,), "(C,)")
        if p.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {p.dtype}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    xp = get_array_module(x)

    xg = x.reshape(n, g, -1)  # (N, G, M)
    mean = xg.mean(axis=2, keepdims=True)  # (N, G, 1)
    xc = xg - mean  # (N, G, M) centered
    var = (xc * xc).mean(axis=2, keepdims=True)  # (N, G, 1) biased, as PyTorch
    rstd = 1.0 / xp.sqrt(var + float(eps))  # (N, G, 1)
    xhat = (xc * rstd).reshape(x.shape)  # (N, C, *S) normalized input
    y = xhat * gamma.reshape(_channel_shape(x)) + beta.reshape(_channel_shape(x))  # (N, C, *S)
    cache = (
        x,  # (N, C, *S) the input, a reference: xhat is recomputed from it in the backward
        gamma,  # (C,) the scale: dxhat = dy * gamma needs it (beta is not needed)
        mean,  # (N, G, 1) per-group mean, to recompute xhat without a second reduction
        rstd,  # (N, G, 1) per-group 1 / sqrt(var + eps), for xhat and for dx
        g,  # G, the number of groups
    )
    return y, cache


def groupnorm_backward(dy, cache):
    """dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),  dxhat = dy * gamma_c

    dgamma_c = sum_{N, S} dy * xhat,   dbeta_c = sum_{N, S} dy.

    Inputs:  dy (N, C, *S), the upstream gradient dL/dy; cache from groupnorm_forward.
    Returns: dx (N, C, *S), dgamma (C,), dbeta (C,).
    """
    x, gamma, mean, rstd, g = cache
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    n = x.shape[0]
    over_n_and_s = (0,) + tuple(range(2, x.ndim))  # reduce over batch and spatial dims
    xhat = (x.reshape(n, g, -1) - mean) * rstd  # (N, G, M) recomputed, as in the forward
    # forward: y = xhat * gamma + beta
    dbeta = dy.sum(axis=over_n_and_s)  # (C,)
    dgamma = (dy * xhat.reshape(x.shape)).sum(axis=over_n_and_s)  # (C,)
    dxhat = (dy * gamma.reshape(_channel_shape(x))).reshape(n, g, -1)  # (N, G, M)
    # forward: xhat = (x - mean) * rstd, with mean and rstd functions of every x in the group
    dx = rstd * (
        dxhat
        - dxhat.mean(axis=2, keepdims=True)
        - xhat * (dxhat * xhat).mean(axis=2, keepdims=True)
    )  # (N, G, M)
    return dx.reshape(x.shape), dgamma, dbeta
