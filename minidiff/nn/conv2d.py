"""2-D convolution (cross-correlation, as PyTorch's F.conv2d), forward and hand-written backward.

Shape legend: N batch, C_in / C_out channels, H W input size, kh kw kernel size, s stride,
(pt, pb, pl, pr) zero padding top/bottom/left/right, Ho = (H + pt + pb - kh) // s + 1 and
Wo = (W + pl + pr - kw) // s + 1 output size, K = C_in*kh*kw patch length, L = Ho*Wo positions.

The reference: pad + im2col + ONE matmul + bias (cs231n's conv_forward_im2col). The faster
lowerings (batch chunks, Winograd F(2x2, 3x3), 1x1 convs as a matmul, dx as a flipped conv, the
CUDA kernels) are in minidiff/fast/conv.py, tested against these; the loop version is a test
oracle (tests/oracles/conv2d_naive.py).
"""

from __future__ import annotations

import numbers

from ._check import check_float, check_ndim, check_same_backend, check_shape
from .im2col import col2im, im2col


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """y[n, o, oh, ow] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, s*oh + i, s*ow + j]

    computed as y_col = w_col @ cols + b with cols = im2col(x_pad) (K, N*L) and w_col = w as (C_out, K).

    Inputs:  x (N, C_in, H, W), w (C_out, C_in, kh, kw), b (C_out,) or None, one float dtype;
             stride int >= 1; padding int p >= 0 (all sides) or (top, bottom, left, right).
    Returns: y (N, C_out, Ho, Wo) in x's dtype, and the cache for conv2d_backward.
    """
    s, pads, Ho, Wo = check_conv2d(x, w, b, stride, padding)
    N, C_out, kh, kw = x.shape[0], w.shape[0], w.shape[2], w.shape[3]
    cols = im2col(x, kh, kw, s, pads)  # (K, N*L)
    y_col = w.reshape(C_out, -1) @ cols  # (C_out, N*L)
    if b is not None:
        y_col += b[:, None]  # (C_out, N*L)
    y = y_col.reshape(C_out, N, Ho, Wo).transpose(1, 0, 2, 3).copy()  # (N, C_out, Ho, Wo), contiguous
    cache = (
        x,  # (N, C_in, H, W) the input, not its columns: cols are kh*kw times bigger, and a net holds
            # every conv's cache until its backward, so backward rebuilds them (one copy per tap) instead
        w,  # (C_out, C_in, kh, kw) the weight: dcols = w_col^T @ dy_col needs it
        b is not None,  # whether there was a bias, so db can be None when b was None
        s,  # the stride, validated
        pads,  # (pt, pb, pl, pr) the zero padding, validated
    )
    return y, cache


def conv2d_backward(dy, cache):
    """db = sum_{n, oh, ow} dy,   dw = dy_col cols^T,   dcols = w_col^T dy_col,   dx = col2im(dcols)

    with dy_col = dy as (C_out, N*L): the matmul's two gradients, then col2im sends each patch
    entry back to the pixel it was copied from (overlaps summed, padding dropped).

    Inputs:  dy (N, C_out, Ho, Wo) upstream gradient; cache from conv2d_forward.
    Returns: dx (N, C_in, H, W), dw (C_out, C_in, kh, kw), db (C_out,) or None.
    """
    x, w, has_bias, s, pads = cache
    check_conv2d_dy(dy, cache)
    C_out, _, kh, kw = w.shape
    dy_col = dy.transpose(1, 0, 2, 3).reshape(C_out, -1)  # (C_out, N*L)
    cols = im2col(x, kh, kw, s, pads)  # (K, N*L), rebuilt from x (see the cache note)
    # forward: y_col = w_col @ cols + b[:, None]
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    dw = (dy_col @ cols.T).reshape(w.shape)  # (C_out, K) as (C_out, C_in, kh, kw)
    dcols = w.reshape(C_out, -1).T @ dy_col  # (K, N*L)
    # forward: cols = im2col(x, kh, kw, s, pads)
    dx = col2im(dcols, x.shape, kh, kw, s, pads)  # (N, C_in, H, W)
    return dx, dw, db


# ------------------------------------------------------------------------------------------ validation

def check_conv2d(x, w, b, stride, padding) -> tuple:
    """Validate a conv's arguments (ValueError naming the argument); return (s, pads, Ho, Wo)."""
    check_same_backend(x=x, w=w, b=b)
    for name, a, ndim, legend in (("x", x, 4, "(N, C_in, H, W)"), ("w", w, 4, "(C_out, C_in, kh, kw)")):
        check_float(name, a)
        check_ndim(name, a, ndim, legend)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"w.shape[1] (C_in) must equal x.shape[1] = {x.shape[1]}, got w shape {tuple(w.shape)}")
    if b is not None:
        check_float("b", b)
        check_shape("b", b, (w.shape[0],), "(C_out,)")
    for name, a in (("w", w), ("b", b)):
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    s = _check_int("stride", stride, 1)
    if isinstance(padding, (tuple, list)) and len(padding) != 4:
        raise ValueError(f"padding must be an int or a 4-tuple (top, bottom, left, right), got {padding!r}")
    pt, pb, pl, pr = (tuple(_check_int("padding", p, 0) for p in padding) if isinstance(padding, (tuple, list))
                      else (_check_int("padding", padding, 0),) * 4)
    (H, W), (kh, kw) = x.shape[2:], w.shape[2:]
    if H + pt + pb < kh or W + pl + pr < kw:
        raise ValueError(f"the padded input {(H + pt + pb, W + pl + pr)} is smaller than the kernel {(kh, kw)}; "
                         f"increase padding or the input size")
    return s, (pt, pb, pl, pr), (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1


def check_conv2d_dy(dy, cache) -> tuple:
    """Raise ValueError unless dy has the shape of the output of the conv that made cache; return (Ho, Wo)."""
    x, w, _, s, (pt, pb, pl, pr) = cache
    (N, _, H, W), (C_out, _, kh, kw) = x.shape, w.shape
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    check_shape("dy", dy, (N, C_out, Ho, Wo), "(N, C_out, Ho, Wo)")
    return Ho, Wo


def _check_int(name: str, v, low: int) -> int:
    """Return v as an int, or raise ValueError unless v is an integer >= low (bool refused)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    return int(v)
