"""Fully connected layer: y = x w^T + b, with its hand-written backward.

Shape legend: ... any leading dims (batch, tokens), in input features, out output features.
Layout is PyTorch's nn.Linear: weight (out, in), bias (out,).
"""

from __future__ import annotations

from ._check import check_float, check_ndim, check_same_backend, check_shape


def _check_same_dtype(x, **arrays) -> None:
    """Raise ValueError when a parameter's dtype differs from x's (that would upcast silently)."""
    for name, a in arrays.items():
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")


def linear_forward(x, w, b=None):
    """y = x @ w^T + b   (PyTorch F.linear)

    Inputs:  x (..., in), w (out, in), b (out,) or None; float32 or float64, one dtype.
    Returns: y (..., out) in x's dtype, and the cache for linear_backward.
    """
    check_same_backend(x=x, w=w, b=b)
    check_float("x", x)
    check_float("w", w)
    check_ndim("w", w, 2, "(out, in)")
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., in) with at least 1 dim, got shape {tuple(x.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"x's last dim (in) must equal w.shape[1] = {w.shape[1]}, got x shape {tuple(x.shape)}")
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (w.shape[0],), "(out,)")
    _check_same_dtype(x, w=w, b=b)

    y = x @ w.T  # (..., out)
    if b is not None:
        y = y + b  # (..., out)
    cache = (
        x,  # (..., in) the input: dw = dy^T x needs it; a reference, not a copy
        w,  # (out, in) the weight: dx = dy w needs it
        b is not None,  # whether there was a bias, so db can be None when b was None
    )
    return y, cache


def linear_backward(dy, cache):
    """dx = dy @ w,   dw = sum_over_... dy^T x,   db = sum_over_... dy

    Inputs:  dy (..., out), the upstream gradient dL/dy; cache from linear_forward.
    Returns: dx (..., in), dw (out, in), db (out,) or None when the forward had no bias.
    """
    x, w, has_bias = cache
    check_shape("dy", dy, x.shape[:-1] + (w.shape[0],), "(..., out)")
    out_features, in_features = w.shape
    dy2 = dy.reshape(-1, out_features)  # (M, out), M = prod(...)
    # forward: y = x @ w.T
    dx = dy @ w  # (..., in)
    dw = dy2.T @ x.reshape(-1, in_features)  # (out, in)
    # forward: y = y + b   (b broadcast over the leading dims)
    db = dy2.sum(axis=0) if has_bias else None  # (out,)
    return dx, dw, db
