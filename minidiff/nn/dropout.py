"""Inverted dropout (Srivastava et al. 2014), PyTorch's F.dropout, with its backward.

Shape legend: ... any shape; the mask has the shape of x; M = the entries of one row (x[0]).

The keep-mask of a seed is a function of (seed, shape) only: entry i (in C order) is kept when the
i-th SplitMix64 output of the stream keyed by the seed is >= p 2^64 (splitmix64.py). It is drawn
on x's backend (on a GPU, by a few whole-array ops there: nothing is drawn on the host or copied),
and NumPy and CuPy give the same mask bit for bit. Pass mask= to inject one explicitly (oracle
use, or to match another framework).
"""

from __future__ import annotations

import numbers

import numpy as np

from ..backend import device_of, get_array_module, to_device
from ._check import check_float, check_shape
from .splitmix64 import check_key, splitmix64

PIECE = 2**16  # outputs drawn at a time on NumPy, so that their ops run in the CPU cache


def _check_p(p) -> float:
    """Raise ValueError unless p is a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"p (the drop probability) must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout_mask(seed, shape, p, rows=None, xp=np):
    """mask_i = (u_i >= p 2^64),  u_i the i-th SplitMix64 output of the stream keyed by seed, i over shape in C order

    so P(keep) = 1 - p (to 2^-64). seed: an integer (mod 2^64). rows=(start, stop) returns rows
    start:stop of the mask of the whole shape (N, ...), drawing only those rows, so that a batch
    split into shards gets, shard by shard, exactly the masks of the unsplit batch.
    Returns a bool array on xp (numpy or cupy): shape, or (stop - start,) + shape[1:] with rows.
    """
    key = check_key("seed", seed)
    p = _check_p(p)
    shape = tuple(int(d) for d in shape)
    start, stop = (0, shape[0] if shape else 1) if rows is None else (int(rows[0]), int(rows[1]))
    if rows is not None and not (shape and 0 <= start <= stop <= shape[0]):
        raise ValueError(f"rows must be (start, stop) with 0 <= start <= stop <= shape[0], got {rows} "
                         f"for shape {shape}")
    row = int(np.prod(shape[1:], dtype=np.int64)) if shape else 1  # M entries per row
    lo, hi = start * row, stop * row  # the stream positions of these rows
    threshold = np.uint64(min(int(p * 2.0**64), 2**64 - 1))  # p 2^64, exact for a float p
    mask = xp.empty(hi - lo, dtype=bool)
    step = PIECE if xp is np else max(1, hi - lo)
    for i in range(lo, hi, step):
        j = min(hi, i + step)
        mask[i - lo:j - lo] = splitmix64(key, i, j, xp) >= threshold
    return mask.reshape(shape if rows is None else (stop - start,) + shape[1:])


def dropout_forward(x, p, train=True, mask=None, seed=None):
    """y = x * mask / (1 - p),   mask_i ~ Bernoulli(1 - p) (True = keep);   identity if not train or p = 0

    Inputs:  x (...) float32 or float64; p drop probability in [0, 1); train bool;
             mask (...) bool of x's shape, True = keep (dropout_mask(seed, x.shape, p) when None);
             seed: an integer (None = a fresh one from the OS's entropy).
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
        seed = int(np.random.SeedSequence().entropy) if seed is None else seed
        mask = dropout_mask(seed, x.shape, p, xp=get_array_module(x))  # (...) on x's backend: P(keep) = 1 - p
    mask = to_device(mask, device_of(x))  # (...) bool, on x's backend (a given host mask is copied)
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
