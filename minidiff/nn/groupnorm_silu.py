"""GroupNorm then SiLU, y = silu(GroupNorm(x)): the pair that opens both halves of every resnet block
and the U-Net's output head (diffusers' norm1 -> nonlinearity, norm2 -> nonlinearity, conv_norm_out ->
conv_act).

Shape legend: N batch, C channels, *S any number of spatial dims, G groups.

Here it is the two ops in turn, and the backward the two backwards in reverse. It is one op of the
ops table so that a speed-minded table can run the pair in GroupNorm's own GPU kernels, applying SiLU as
they write and never storing h = GroupNorm(x).
"""

from __future__ import annotations

from .activations import silu_backward, silu_forward
from .groupnorm import groupnorm_backward, groupnorm_forward


def groupnorm_silu_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = silu(h) = h * sigma(h),   h = gamma_c * (x - mean_g) / sqrt(var_g + eps) + beta_c

    Inputs:  as groupnorm_forward: x (N, C, *S) float32 or float64; gamma (C,), beta (C,) in x's
             dtype; num_groups G int dividing C; eps >= 0.
    Returns: y (N, C, *S) in x's dtype, and the cache for groupnorm_silu_backward.
    """
    h, norm = groupnorm_forward(x, gamma, beta, num_groups, eps)  # (N, C, *S)
    y, act = silu_forward(h)  # (N, C, *S)
    return y, (norm, act)  # the two ops' caches


def groupnorm_silu_backward(dy, cache):
    """dx, dgamma, dbeta = groupnorm_backward(dh),   dh = dy * silu'(h) = dy * sigma(h) (1 + h (1 - sigma(h)))

    Inputs:  dy (N, C, *S), the upstream gradient dL/dy; cache from groupnorm_silu_forward.
    Returns: dx (N, C, *S), dgamma (C,), dbeta (C,).
    """
    norm, act = cache
    # forward: y = silu(h)
    dh = silu_backward(dy, act)  # (N, C, *S)
    # forward: h = groupnorm(x)
    return groupnorm_backward(dh, norm)
