"""Group normalization (Wu & He 2018), PyTorch's F.group_norm, with its hand-written backward.

Shape legend: N batch, C channels, *S any number of spatial dims (none, (H, W), ...),
G groups, Cg = C / G channels per group, L = prod(S) positions, M = Cg * L elements
normalized together.

The cache follows llm.c's layernorm (doc/layernorm/layernorm.md): the forward keeps the
per-group mean and rstd = 1 / sqrt(var + eps) (two numbers per group) and a reference to x
(which the network keeps anyway), and the backward recomputes xhat = (x - mean) * rstd from
them. Caching xhat would cost one more activation-sized array per layer to save two
elementwise ops.

This is the readable version, formula for formula; a version folded into fewer whole-array
passes, and GPU kernels, sit outside nn/ and are tested against it.
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
    """y = gamma_c * xhat + beta_c,   xhat = (x - mean_g) / sqrt(var_g + eps)   (PyTorch F.group_norm)

    mean_g and the biased variance var_g = mean_g((x - mean_g)^2) are taken over the M elements
    of each (sample, group): the Cg channels of group g and all spatial positions.

    Inputs:  x (N, C, *S) float32 or float64 (S may be empty, e.g. x (N, C));
             gamma (C,), beta (C,) in x's dtype; num_groups G int dividing C; eps >= 0.
    Returns: y (N, C, *S) in x's dtype, and the cache for groupnorm_backward.
    """
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    xp = get_array_module(x)
    n, c = x.shape[:2]
    xg = x.reshape(n, g, -1)  # (N, G, M) each row one (sample, group)
    mean = xg.mean(axis=2)  # (N, G)
    xc = xg - mean[:, :, None]  # (N, G, M) centered
    var = (xc * xc).mean(axis=2)  # (N, G) biased, as PyTorch; two passes, so no E[x^2] - E[x]^2 cancellation
    rstd = 1.0 / xp.sqrt(var + float(eps))  # (N, G)
    xhat = (xc * rstd[:, :, None]).reshape(x.shape)  # (N, C, *S)
    per_channel = (1, c) + (1,) * (x.ndim - 2)  # gamma and beta broadcast over N and *S
    y = gamma.reshape(per_channel) * xhat + beta.reshape(per_channel)  # (N, C, *S)
    cache = (
        x,  # (N, C, *S) the input, a reference: xhat is recomputed from it in the backward
        gamma,  # (C,) the scale: dxhat = dy * gamma needs it (beta is not needed)
        mean,  # (N, G) per-group mean, to recompute xhat without a second reduction
        rstd,  # (N, G) per-group 1 / sqrt(var + eps), for xhat and the chain rule through it
        g,  # G, the number of groups
    )
    return y, cache


def groupnorm_backward(dy, cache):
    """dx = rstd * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)),   dxhat = dy * gamma_c
    dgamma_c = sum_{N, S} dy * xhat,   dbeta_c = sum_{N, S} dy.

    mean_g is over the M elements of each (sample, group); the derivation is in
    docs/backprop/groupnorm.md.

    Inputs:  dy (N, C, *S), the upstream gradient dL/dy; cache from groupnorm_forward.
    Returns: dx (N, C, *S), dgamma (C,), dbeta (C,).
    """
    x, gamma, mean, rstd, g = cache
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    n, c = x.shape[:2]
    over_ns = (0,) + tuple(range(2, x.ndim))  # the axes gamma and beta are broadcast over: N and *S
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    xhat = ((x.reshape(n, g, -1) - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)  # (N, C, *S) recomputed
    # forward: y = gamma_c * xhat + beta_c
    dbeta = dy.sum(axis=over_ns)  # (C,)
    dgamma = (dy * xhat).sum(axis=over_ns)  # (C,)
    dxhat = dy * gamma.reshape(per_channel)  # (N, C, *S)
    # forward: xhat = (x - mean_g) * rstd_g, with mean_g and rstd_g functions of every x in the group
    dxhat_g, xhat_g = dxhat.reshape(n, g, -1), xhat.reshape(n, g, -1)  # (N, G, M)
    dx = rstd[:, :, None] * (dxhat_g
                             - dxhat_g.mean(axis=2, keepdims=True)  # through mean_g
                             - xhat_g * (dxhat_g * xhat_g).mean(axis=2, keepdims=True))  # through rstd_g
    return dx.reshape(x.shape), dgamma, dbeta
