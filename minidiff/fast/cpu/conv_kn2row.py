"""A stride-1 conv with fewer output than input channels, without im2col columns of x (NumPy).

    y[n, o, h, v] = b[o] + sum_{c, i, j} w[o, c, i, j] x_pad[n, c, h + i, v + j]          (nn/conv2d.py)
                  = b[o] + sum_{i, j} Z[n, i, j, o, h + i - pt, v + j - pl],   Z[n, i, j] = w[:, :, i, j] @ x_n

The reference builds im2col columns of x, kh*kw*C_in rows per output position, and multiplies
them by w (C_out, kh*kw*C_in). Here one GEMM per sample multiplies x_n (C_in, H*W) by all the taps
at once, w_all (kh*kw*C_out, C_in), and each tap's C_out planes are added into y shifted by the
tap's offset ("kn2row", Vasudevan et al. 2017): the same multiplies, but the copies and adds touch
kh*kw*C_out planes instead of kh*kw*C_in. For conv_out (C_in = 32 or 128, C_out = 3) that is the
difference between a 9*C_in-row column copy of the whole batch and 27 shifted adds.

The backward takes the columns of dy instead, which are as small (C_out*kh*kw rows):

    dx = conv2d(dy, w_flip, padding = k - 1 - pads)     w_flip[c, o, i, j] = w[o, c, kh-1-i, kw-1-j]
    dw[o, c, i, j] = sum_{n, h, v} cols_dy[o, kh-1-i, kw-1-j, n, h, v] x[n, c, h, v]

with cols_dy = im2col(dy) at the flipped padding: both are the reference's sums (nn/conv2d.py's
dx = col2im(w_col^T dy_col), dw = dy_col cols^T) re-indexed, equal up to rounding
(tests/fast/test_conv_kn2row.py, float64, against the reference).

Shape legend: N batch, n the samples of one batch chunk, C_in / C_out channels, H W input size,
kh kw kernel size, (pt, pb, pl, pr) zero padding, Ho Wo output size, L = H*W input positions,
K' = C_out*kh*kw rows of dy's columns.
"""

from __future__ import annotations

import numpy as np

from ...backend import get_array_module
from .conv_lowering import chunks, im2col_taps, taps


def applies(x, w, s: int, pads) -> bool:
    """Whether this lowering computes the conv: NumPy, stride 1, every pad <= k - 1 (so that the backward's
    flipped padding k - 1 - pad is >= 0)."""
    _, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    return get_array_module(x) is np and s == 1 and max(pt, pb) <= kh - 1 and max(pl, pr) <= kw - 1


def pays(x, w, s: int, pads) -> bool:
    """Whether it also beats im2col: C_out < C_in (fewer planes to add than to copy), not a 1x1 kernel."""
    C_out, C_in, kh, kw = w.shape
    return applies(x, w, s, pads) and C_out < C_in and (kh, kw) != (1, 1)


def kn2row_forward(x, w, b, pads, Ho: int, Wo: int):
    """y (N, C_out, Ho, Wo) = sum over taps (i, j) of Z[:, i, j] shifted, Z = w_all @ x per sample (module docstring)."""
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, _, pl, _ = pads
    w_all = np.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(kh * kw * C_out, C_in)  # rows (i, j, o)
    y = np.empty((N, C_out, Ho, Wo), dtype=x.dtype)
    col_taps = [taps(j - pl, 1, W, Wo) for j in range(kw)]
    for nb in chunks(x, kh * kw * C_out, H * W):
        n = nb.stop - nb.start
        Z = (w_all @ x[nb].reshape(n, C_in, H * W)).reshape(n, kh, kw, C_out, H, W)  # one GEMM per sample
        yb = y[nb]
        if b is None:
            yb[...] = 0
        else:
            yb[...] = b[:, None, None]
        for i in range(kh):
            a0, a1, r0 = taps(i - pt, 1, H, Ho)  # output rows [a0, a1) read input rows r0, r0 + 1, ...
            for j, (b0, b1, c0) in enumerate(col_taps):
                # forward (reference): y[.., h, v] += w[:, :, i, j] @ x_pad[.., h + i, v + j] (0 in the padding)
                yb[:, :, a0:a1, b0:b1] += Z[:, i, j, :, r0:r0 + a1 - a0, c0:c0 + b1 - b0]
    return y


def kn2row_backward(dy, x, w, has_bias, pads):
    """dx (N, C_in, H, W), dw (C_out, C_in, kh, kw), db (C_out,) or None from dy's columns (module docstring)."""
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    flip_pads = (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr)
    w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C_in, -1)  # (C_in, K'), a copy
    dt = np.result_type(dy.dtype, w.dtype)
    # forward: y = conv(x, w) + b
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    dx = np.empty(x.shape, dtype=dt)
    dw_t = None  # (K', C_in) summed over the chunks, rows (o, i', j') with i' = kh-1-i, j' = kw-1-j
    for nb in chunks(x, C_out * kh * kw, H * W):
        n = nb.stop - nb.start
        cols = im2col_taps(dy[nb], kh, kw, 1, flip_pads, H, W).reshape(-1, n, H * W)  # (K', n, L)
        per_sample = cols.transpose(1, 0, 2)  # (n, K', L), a view
        # dx[n, c, r, q] = sum_{o, i, j} w[o, c, i, j] dy_pad'[n, o, r + kh-1-i, q + kw-1-j]
        dx[nb] = (w_flip @ per_sample).reshape(n, C_in, H, W)
        # dw[o, c, i, j] = sum_{n, r, q} dy_pad'[n, o, r + kh-1-i, q + kw-1-j] x[n, c, r, q]
        part = (per_sample @ x[nb].reshape(n, C_in, H * W).transpose(0, 2, 1)).sum(axis=0)  # (K', C_in)
        dw_t = part if dw_t is None else dw_t + part
    dw = dw_t.reshape(C_out, kh, kw, C_in)[:, ::-1, ::-1].transpose(0, 3, 1, 2)  # (C_out, C_in, kh, kw)
    return dx, np.ascontiguousarray(dw), db
