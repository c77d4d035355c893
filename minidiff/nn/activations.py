"""SiLU / swish activation (Elfwing et al. 2018; Ramachandran et al. 2017), PyTorch's F.silu.

Shape legend: ... any shape; the op is elementwise.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ._check import check_float, check_shape


def _sigmoid(x):
    """sigma(x) = 1 / (1 + exp(-x))

    Computed as written, in place: exp(-x) overflows to inf for x below about -88 (float32) or
    -709 (float64), and 1 / (1 + inf) = 0 is then the correctly rounded result, so the overflow
    warning is silenced. Accurate to a few ulp relative in both tails (the tanh form
    (1 + tanh(x / 2)) / 2 loses all relative accuracy below x = -20 and returns 0 below about -37
    in float64), and one transcendental ufunc with two in-place updates: cheap in NumPy.
    """
    xp = get_array_module(x)
    s = xp.negative(x, out=xp.empty_like(x))  # (...) in x's dtype (an array also when x is 0-d)
    with np.errstate(over="ignore"):
        xp.exp(s, out=s)
    s += 1
    xp.reciprocal(s, out=s)
    return s


def silu_forward(x):
    """y = x * sigma(x),   sigma(x) = 1 / (1 + exp(-x))

    Inputs:  x (...) float32 or float64.
    Returns: y (...) in x's dtype, and the cache for silu_backward.
    """
    check_float("x", x)
    y = _sigmoid(x)  # (...) a new array: sigma(x), then
    y *= x  # x * sigma(x), in place
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
    dx = 1 - s  # (...) then, in place: dy * s * (1 + x * (1 - s))
    dx *= x
    dx += 1
    dx *= s
    dx *= dy
    return dx
