"""2-D convolution (cross-correlation, as PyTorch's F.conv2d), forward and hand-written backward.

Shape legend: N batch, C_in / C_out channels, H W input size, kh kw kernel size, s stride,
(pt, pb, pl, pr) zero padding top/bottom/left/right, Ho = (H + pt + pb - kh) // s + 1 and
Wo = (W + pl + pr - kw) // s + 1 output size, K = C_in*kh*kw patch length, L = Ho*Wo positions.

Two versions live side by side (llm.c's matmul_forward_naive, cs231n's fast_layers):
  conv2d_forward / conv2d_backward              im2col + one BLAS matmul (fast)
  conv2d_naive_forward / conv2d_naive_backward  explicit loops (slow, obviously right)
Tests check that both give the same numbers.
"""

from __future__ import annotations

import numbers

from ..backend import get_array_module
from ._check import check_float, check_ndim, check_same_backend, check_shape


def _check_int(name: str, v, low: int) -> int:
    """Return v as an int, or raise ValueError unless v is an integer >= low (bool refused)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)


def _pads(padding) -> tuple:
    """padding: int p (all sides) or (top, bottom, left, right) -> (pt, pb, pl, pr), all >= 0."""
    if isinstance(padding, (tuple, list)):
        if len(padding) != 4:
            raise ValueError(f"padding must be an int or a 4-tuple (top, bottom, left, right), got {padding!r}")
        return tuple(_check_int("padding", p, 0) for p in padding)
    return (_check_int("padding", padding, 0),) * 4


def _setup(x, w, b, stride, padding):
    """Validate the arguments of a conv forward; return (stride, pads, Ho, Wo)."""
    check_same_backend(x=x, w=w, b=b)
    check_float("x", x)
    check_float("w", w)
    check_ndim("x", x, 4, "(N, C_in, H, W)")
    check_ndim("w", w, 4, "(C_out, C_in, kh, kw)")
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w.shape[1] (C_in) must equal x.shape[1] = {x.shape[1]}, got w shape {tuple(w.shape)}")
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (w.shape[0],), "(C_out,)")
    for name, a in (("w", w), ("b", b)):
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    s = _check_int("stride", stride, 1)
    pt, pb, pl, pr = _pads(padding)
    (H, W), (kh, kw) = x.shape[2:], w.shape[2:]
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    if H + pt + pb < kh or W + pl + pr < kw:
        raise ValueError(f"the padded input {(H + pt + pb, W + pl + pr)} is smaller than the kernel {(kh, kw)}; "
                         f"increase padding or the input size")
    return s, (pt, pb, pl, pr), Ho, Wo


def _pad(x, pads):
    """Zero-pad the last two dims of x by (top, bottom, left, right); x itself when all are 0."""
    if not any(pads):
        return x
    pt, pb, pl, pr = pads
    return get_array_module(x).pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def _im2col(x_pad, kh, kw, s, Ho, Wo):
    """cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j], returned as (K, N*L).

    One strided copy per kernel offset (i, j). The batch sits inside the column index, so the
    whole convolution is ONE 2-D BLAS matmul (K, N*L) instead of N small ones.
    """
    xp = get_array_module(x_pad)
    N, C = x_pad.shape[:2]
    xc = x_pad.transpose(1, 0, 2, 3)  # (C, N, Hp, Wp) view
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x_pad.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = xc[:, :, i:i + s * Ho:s, j:j + s * Wo:s]
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """y[n, o, oh, ow] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, s*oh + i, s*ow + j]

    computed as y = w_col @ cols with cols = im2col(x_pad) (K, N*L) and w_col = w (C_out, K).

    Inputs:  x (N, C_in, H, W), w (C_out, C_in, kh, kw), b (C_out,) or None, one float dtype;
             stride int >= 1; padding int p >= 0 (all sides) or (top, bottom, left, right).
    Returns: y (N, C_out, Ho, Wo) in x's dtype, and the cache for conv2d_backward.
    """
    s, pads, Ho, Wo = _setup(x, w, b, stride, padding)
    xp = get_array_module(x)
    N = x.shape[0]
    C_out, _, kh, kw = w.shape
    w_col = w.reshape(C_out, -1)  # (C_out, K)
    cols = _im2col(_pad(x, pads), kh, kw, s, Ho, Wo)  # (K, N*L)
    y = (w_col @ cols).reshape(C_out, N, Ho, Wo).transpose(1, 0, 2, 3)  # (N, C_out, Ho, Wo)
    if b is not None:
        y = y + b[:, None, None]  # (N, C_out, Ho, Wo)
    y = xp.ascontiguousarray(y)
    cache = (
        x,  # (N, C_in, H, W) the input, not its columns: cols are kh*kw times bigger, so
            # backward rebuilds them (one strided copy) instead of holding them across the net
        w,  # (C_out, C_in, kh, kw) the weight: dcols = w_col^T @ dy needs it
        b is not None,  # whether there was a bias, so db can be None when b was None
        s,  # the stride, validated
        pads,  # (pt, pb, pl, pr) the zero padding, validated
    )
    return y, cache


def conv2d_backward(dy, cache):
    """dw = dy_col cols^T,   dcols = w_col^T dy_col,   dx = col2im(dcols),   db = sum_{n,oh,ow} dy

    with dy_col = dy as (C_out, N*L). col2im scatters each patch entry back to the pixel it was
    copied from, summing overlaps.

    Inputs:  dy (N, C_out, Ho, Wo) upstream gradient; cache from conv2d_forward.
    Returns: dx (N, C_in, H, W), dw (C_out, C_in, kh, kw), db (C_out,) or None.
    """
    x, w, has_bias, s, pads = cache
    xp = get_array_module(dy, x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    check_shape("dy", dy, (N, C_out, Ho, Wo), "(N, C_out, Ho, Wo)")
    w_col = w.reshape(C_out, -1)  # (C_out, K)

    # forward: y = y + b[:, None, None]
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    # forward: y = (w_col @ cols) as (N, C_out, Ho, Wo)
    dy_col = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(C_out, N * Ho * Wo)  # (C_out, N*L)
    cols = _im2col(_pad(x, pads), kh, kw, s, Ho, Wo)  # (K, N*L), rebuilt (see the cache note)
    # dw = dy_col @ cols^T, evaluated as (cols @ dy_col^T)^T: same numbers, but OpenBLAS is several
    # times faster when the long N*L axis is the inner dimension of a row-major (K, N*L) operand
    dw = (cols @ dy_col.T).T.reshape(w.shape)  # (C_out, C_in, kh, kw)
    dcols = (w_col.T @ dy_col).reshape(C_in, kh, kw, N, Ho, Wo)  # (K, N*L) as patches

    # forward: cols[:, i, j] = x_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s]   (col2im, overlaps summed)
    dx_pad = xp.zeros((C_in, N, H + pt + pb, W + pl + pr), dtype=dcols.dtype)  # channel-major, like cols
    for i in range(kh):
        for j in range(kw):
            dx_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += dcols[:, i, j]
    # forward: x_pad = pad(x, pads)   (slice by explicit ends: x[p:-p] would be empty for p = 0)
    dx = xp.ascontiguousarray(dx_pad[:, :, pt:pt + H, pl:pl + W].transpose(1, 0, 2, 3))  # (N, C_in, H, W)
    return dx, dw, db


def conv2d_naive_forward(x, w, b=None, stride=1, padding=0):
    """Loop version of conv2d_forward (same signature, same cache layout): one output at a time,

        y[n, o, oh, ow] = b[o] + sum(w[o] * x_pad[n, :, s*oh : s*oh + kh, s*ow : s*ow + kw])
    """
    s, pads, Ho, Wo = _setup(x, w, b, stride, padding)
    xp = get_array_module(x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    x_pad = xp.zeros((N, C_in, H + pt + pb, W + pl + pr), dtype=x.dtype)
    x_pad[:, :, pt:pt + H, pl:pl + W] = x
    y = xp.zeros((N, C_out, Ho, Wo), dtype=x.dtype)
    for n in range(N):
        for o in range(C_out):
            for oh in range(Ho):
                for ow in range(Wo):
                    window = x_pad[n, :, s * oh:s * oh + kh, s * ow:s * ow + kw]  # (C_in, kh, kw)
                    y[n, o, oh, ow] = xp.sum(window * w[o]) + (b[o] if b is not None else 0)
    cache = (
        x,  # (N, C_in, H, W) the input
        w,  # (C_out, C_in, kh, kw) the weight
        b is not None,  # whether there was a bias
        s,  # the stride
        pads,  # (pt, pb, pl, pr) the zero padding
    )
    return y, cache


def conv2d_naive_backward(dy, cache):
    """Loop version of conv2d_backward: each output y[n, o, oh, ow] sends its gradient back

        dw[o]      += dy[n, o, oh, ow] * window,   d(window) += dy[n, o, oh, ow] * w[o],   db[o] += dy[n, o, oh, ow]
    """
    x, w, has_bias, s, pads = cache
    xp = get_array_module(dy, x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    check_shape("dy", dy, (N, C_out, Ho, Wo), "(N, C_out, Ho, Wo)")
    x_pad = xp.zeros((N, C_in, H + pt + pb, W + pl + pr), dtype=x.dtype)
    x_pad[:, :, pt:pt + H, pl:pl + W] = x
    dx_pad = xp.zeros_like(x_pad)
    dw = xp.zeros_like(w)
    db = xp.zeros(C_out, dtype=w.dtype) if has_bias else None
    for n in range(N):
        for o in range(C_out):
            for oh in range(Ho):
                for ow in range(Wo):
                    g = dy[n, o, oh, ow]
                    rows, cols = slice(s * oh, s * oh + kh), slice(s * ow, s * ow + kw)
                    dw[o] += g * x_pad[n, :, rows, cols]
                    dx_pad[n, :, rows, cols] += g * w[o]
                    if has_bias:
                        db[o] += g
    dx = dx_pad[:, :, pt:pt + H, pl:pl + W].copy()  # (N, C_in, H, W)
    return dx, dw, db
