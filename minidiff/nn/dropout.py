"""Inverted dropout (Srivastava et al. 2014), PyTorch's F.dropout, with its backward.

Shape legend: ... any shape; the mask has the shape of x.

The keep-mask is drawn on the HOST with np.random.default_rng(seed) and then moved to x's
backend, so a seed gives the same mask on NumPy and CuPy (CuPy's random streams differ from
NumPy's). Pass mask= to inject one explicitly (oracle use, or to match another framework).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..backend import device_of, to_device
from ._check import check_float, check_shape


def _check_p(p) -> float:
    """Raise ValueError unless p is a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"p (the drop probability) must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout_mask(seed, shape, p, rows=None):
    """mask_i = (u_i >= p),  u ~ U[0, 1) drawn by np.random.default_rng(seed) over the whole shape (host).

    rows=(start, stop) returns rows start:stop of the mask drawn for the whole shape (N, ...), so a
    batch split into shards gets, shard by shard, exactly the masks of the unsplit batch.
    Returns a bool host array: shape, or (stop - start,) + shape[1:] with rows.
    """
    mask = np.random.default_rng(seed).random(shape) >= p  # P(keep) = 1 - p
    return mask if rows is None else mask[rows[0]:rows[1]]


def dropout_forward(x, p, train=True, mask=None, seed=None):
    """y = x * mask / (1 - p),   mask_i ~ Bernoulli(1 - p) (True = keep);   identity if not train or p = 0

    Inputs:  x (...) float32 or float64; p drop probability in [0, 1); train bool;
             mask (...) bool of x's shape, True = keep (drawn with default_rng(seed) when None);
             seed: anything np.random.default_rng accepts (None = fresh entropy).
    Returns: y (...) in x's dtype (a new array, also when it is the identity), and the cache.
    """
    check_float("x", x)
    p = _check_p(p)
    if mask is not None:
        if getattr(mask, "dtype", None) != np.bool_:
            raise ValueError(f"mask must be a bool array (True = keep), got {getattr(mask, 'dtype', type(mask))}")
        check_shape("mask", mask, x.shape, "x.shape")
    if not train or p == 0.0:
        cache = (
            None,  # no mask: the op was the identity, so the backward passes dy through
            x.shape,  # (...) to check dy's shape
        )
        return x.copy(), cache
    if mask is None:
        mask = dropout_mask(seed, x.shape, p)  # (...) on the host: P(keep) = 1 - p
    mask = to_device(mask, device_of(x))  # (...) bool, on x's backend
    scale = 1.0 / (1.0 - p)  # a Python float, so x's dtype is kept
    y = x * mask * scale  # (...)
    cache = (
        (mask, scale),  # the keep-mask (bool, 1 byte per entry rather than a float mask) and 1/(1-p)
        x.shape,  # (...) to check dy's shape
    )
    return y, cache


def dropout_backward(dy, cache):
    """dx = dy * mask / (1 - p)   (dx = dy when the forward was the identity)

    Inputs:  dy (...), the upstream gradient dL/dy; cache from dropout_forward.
    Returns: dx (...), a new array.
    """
    mask_scale, shape = cache
    check_shape("dy", dy, shape, "(...) = x.shape")
    if mask_scale is None:
        # forward: y = x
        return dy.copy()
    mask, scale = mask_scale
    # forward: y = x * mask * scale
    dx = dy * mask * scale  # (...)
    return dx
