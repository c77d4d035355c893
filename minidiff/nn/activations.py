"""SiLU / swish activation (Elfwing et al. 2018; Ramachandran et al. 2017), PyTorch's F.silu.

Shape legend: ... any shape; the op is elementwise.
"""

from __future__ import annotations

from ..backend import get_array_module
from ._check import check_float, check_shape


def _sigmoid(x):
    """sigma(x) = 1 / (1 + exp(-x)), evaluated without overflow: exp only ever sees -|x| <= 0."""
    xp = get_array_module(x)
    e = xp.exp(-xp.abs(x))  # (...) in (0, 1]
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))  # (...)


def silu_forward(x):
    """y = x * sigma(x),   sigma(x) = 1 / (1 + exp(-x))

    Inputs:  x (...) float32 or float64.
    Returns: y (...) in x's dtype, and the cache for silu_backward.
    """
    check_float("x", x)
    y = x * _sigmoid(x)  # (...)
    cache = (
        x,  # (...) the input, a reference; sigma(x) is recomputed in the backward (as PyTorch's
        #     silu_backward does) rather than cached, which would cost one more activation
    )
    return y, cache


def silu_backward(dy, cache):
    """dx = dy * sigma(x) * (1 + x * (1 - sigma(x)))     (d/dx of x sigma(x); sigma' = sigma (1 - sigma))

    Inputs:  dy (...), the upstream gradient dL/dy; cache from silu_forward.
    Returns: dx (...).
    """
    (x,) = cache
    check_shape("dy", dy, x.shape, "(...) = x.shape")
    s = _sigmoid(x)  # (...) recomputed
    # forward: y = x * sigma(x)
    dx = dy * s * (1 + x * (1 - s))  # (...)
    return dx
