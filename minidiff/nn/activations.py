"""SiLU / swish activation (Elfwing et al. 2018; Ramachandran et al. 2017), PyTorch's F.silu.

Shape legend: ... any shape; the op is elementwise.

On CuPy each direction is one fused kernel (_cuda_kernels: the same formulas in the same order),
where the NumPy code below takes 5 array ops forward and 9 backward, each a kernel launch on a
GPU. MINIDIFF_FUSED=0 in the environment turns the fused kernels off (backend.FUSED).
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import get_array_module
from ._check import check_float, check_shape

_KERNELS = {}  # "forward" / "backward" -> cupy.ElementwiseKernel, made on first use

# SiLU and its gradient as CUDA device functions, for these kernels and GroupNorm's (groupnorm_cuda.py):
# the formulas of silu_forward and silu_backward below, in the same order
SILU_CUDA = """
template <typename T> __device__ T minidiff_silu(T x) {
    T s = 1 / (1 + exp(-x));
    return x * s;
}
template <typename T> __device__ T minidiff_silu_grad(T x, T dy) {
    T s = 1 / (1 + exp(-x));
    return ((1 - s) * x + 1) * s * dy;
}
"""


def _cuda_kernels(xp) -> dict:
    """The fused SiLU kernels for CuPy: y = x * s and dx = ((1 - s) * x + 1) * s * dy, s = 1 / (1 + exp(-x))."""
    if not _KERNELS:
        _KERNELS["forward"] = xp.ElementwiseKernel(
            "T x", "T y", "y = minidiff_silu(x);", "minidiff_silu_forward", preamble=SILU_CUDA)
        _KERNELS["backward"] = xp.ElementwiseKernel(
            "T x, T dy", "T dx", "dx = minidiff_silu_grad(x, dy);", "minidiff_silu_backward", preamble=SILU_CUDA)
    return _KERNELS


def _sigmoid(x):
    """sigma(x) = 1 / (1 + exp(-x))

    Computed as written, in place: exp(-x) overflows to inf for x below about -88 (float32) or
    -709 (float64), and 1 / (1 + inf) = 0 is then the correctly rounded result, so the overflow
    warning is silenced. Accurate to a few ulp relative in both tails (the tanh form
    (1 + tanh(x / 2)) / 2 loses all relative accuracy below x = -20 and returns 0 below about -37
    in float64), and one transcendental ufunc with two in-place updates: fast in NumPy.
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
    xp = get_array_module(x)
    if xp is not np and backend.FUSED:
        y = _cuda_kernels(xp)["forward"](x)  # one kernel: the two lines below
    else:
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
    xp = get_array_module(dy, x)
    if xp is not np and backend.FUSED:
        return _cuda_kernels(xp)["backward"](x, dy)  # one kernel: the lines below
    s = _sigmoid(x)  # (...) recomputed
    # forward: y = x * sigma(x)
    dx = 1 - s  # (...) then, in place: dy * s * (1 + x * (1 - s))
    dx *= x
    dx += 1
    dx *= s
    dx *= dy
    return dx
