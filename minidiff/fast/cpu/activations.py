"""SiLU and GroupNorm + SiLU on NumPy with sigma(x) kept from the forward: nn/'s formulas, not recomputed.

    forward   s = sigma(x), y = x s                         (nn/activations.py's _sigmoid, the same passes)
    backward  dx = dy s (1 + x (1 - s))                     (s from the cache: the reference recomputes it)

The reference keeps only x and evaluates sigma again in the backward (4 whole-array passes and an exp per
element); keeping s costs one activation-sized array per SiLU until its backward. The arithmetic is the
reference's, operation for operation, so both outputs equal nn/'s bit for bit (tests/fast/test_norm.py).
Plain SiLU runs on the time embedding (N, T) only, where the extra array is small.

GroupNorm + SiLU: u = -h = GroupNorm(x) with -gamma, -beta by the CPU fold (fast/cpu/groupnorm.py), then
-s = 1 / (-1 - exp(u)) and y = u (-s) = h s written into u's buffer: nn/'s values up to exact negations, one
pass fewer (so y is nn/'s bit for bit). The cache keeps y and -s where
nn/ keeps h: the same memory (the next layer holds y anyway), and the backward needs neither h nor an exp:
    dh = dy (s + y (1 - s))       (= dy s (1 + h (1 - s)), rounded in another order: not bit for bit)
and dh, a buffer of its own, becomes dx in place (groupnorm_backward(..., dy_is_scratch=True)).

Shape legend: ... any shape (SiLU is elementwise); N batch, C channels, *S spatial dims, G groups.
"""

from __future__ import annotations

import numpy as np

from ...nn._check import check_float, check_shape
from ...nn.activations import _sigmoid
from . import groupnorm as groupnorm_cpu


def silu_forward(x):
    """y = x * sigma(x), as nn.activations.silu_forward; the cache (x, sigma(x)) for silu_backward."""
    check_float("x", x)
    s = _sigmoid(x)  # (...) a new array, the reference's passes
    y = s * x  # (...) the reference's y *= x, the same product, in a new array so that s is kept
    cache = (
        x,  # (...) the input, a reference (as nn/'s cache)
        s,  # (...) sigma(x): saves the backward 4 passes and an exp; one more activation held until then
    )
    return y, cache


def silu_backward(dy, cache):
    """dx = dy * s * (1 + x * (1 - s)), s = sigma(x) from the forward, as nn.activations.silu_backward."""
    x, s = cache
    check_shape("dy", dy, x.shape, "(...) = x.shape")
    # forward: y = x * sigma(x)
    dx = 1 - s  # (...) then, in place: dy * s * (1 + x * (1 - s)), the reference's order
    dx *= x
    dx += 1
    dx *= s
    dx *= dy
    return dx


def groupnorm_silu_forward(x, gamma, beta, num_groups, eps=1e-5):
    """y = silu(GroupNorm(x)) = h * sigma(h), as nn.groupnorm_silu.groupnorm_silu_forward; cache (norm, (y, -s), None).

    The fold writes u = -h directly (scale -gamma, shift -beta: negation is exact), which saves the sigmoid's
    first pass (nn/'s s = 1 / (1 + exp(-h)) starts with -h): r = 1 / (-1 - exp(u)) = -s and y = u r = h s,
    each exactly the negative of the reference's value or the value itself, so y is nn/'s bit for bit."""
    u, (_, _, mean, rstd, g) = groupnorm_cpu.groupnorm_forward(x, -gamma, -beta, num_groups, eps)  # (N, C, *S) -h
    with np.errstate(over="ignore"):  # exp(-h) = inf below h ~ -88 (float32): r = -0, as nn/'s _sigmoid gives s = 0
        r = np.exp(u)  # (N, C, *S) a new array: exp(-h), then in place
    np.subtract(-1, r, out=r)  # -(1 + exp(-h))
    np.reciprocal(r, out=r)  # -sigma(h)
    y = u
    y *= r  # (N, C, *S) in u's buffer: (-h)(-s) = h s, the reference's product
    cache = (
        (x, gamma, mean, rstd, g),  # GroupNorm's cache (nn/groupnorm.py's layout), with the real gamma
        (y, r),  # the output (a reference: the caller must not write into it) and -sigma(h). nn/ keeps h (and the
        #          next layer keeps y): the same memory, and silu'(h) = s + y (1 - s) needs neither h nor an exp
        None,  # no beta on NumPy (fast/norm.py's layout: the CUDA kernels keep beta to recompute h)
    )
    return y, cache


def groupnorm_silu_backward(dy, cache):
    """groupnorm_backward(dh), dh = dy * silu'(h) = dy * (s + y (1 - s)), as nn.groupnorm_silu.groupnorm_silu_backward.

    silu'(h) = s (1 + h (1 - s)) = s + y (1 - s) with y = h s: the same value, rounded in another order
    (tests/fast/test_norm.py states the measured difference)."""
    norm, (y, r), _ = cache  # r = -s
    check_shape("dy", dy, y.shape, "(N, C, *spatial)")
    # forward: y = silu(h) = h * s
    dh = 1 + r  # (N, C, *S) 1 - s, then in place: dy * (s + y (1 - s))
    dh *= y
    dh -= r
    dh *= dy
    # forward: h = groupnorm(x)
    return groupnorm_cpu.groupnorm_backward(dh, norm, dy_is_scratch=True)  # dh is ours: dx overwrites it
