"""im2col and its adjoint col2im: every kernel patch of a (zero-padded) image copied into a column,
so that a convolution is one matrix product (conv2d.py), and the columns' gradients summed back.

    cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j]                (im2col, as (K, N*L))
    dx[n, c, r, q] = sum of dcols[c, i, j, n, oh, ow] over s*oh + i - pt = r, s*ow + j - pl = q   (col2im)

Shape legend: N batch, C channels, H W input size, kh kw kernel size, s stride, (pt, pb, pl, pr)
zero padding top/bottom/left/right, Ho Wo output size, K = C*kh*kw patch length, L = Ho*Wo.
"""

from __future__ import annotations

import numpy as np

from .. import backend
from ..backend import get_array_module
from ..fast.cuda.im2col import col2im_cuda, im2col_cuda


def _taps(offset: int, s: int, size: int, n_out: int) -> tuple:
    """Output rows o in [o0, o1) whose input row s*o + offset lies inside [0, size); the others read
    zero padding. Returns (o0, o1, r0): the range and its first input row r0 = s*o0 + offset."""
    o0 = max(0, -(offset // s) if offset < 0 else 0)  # ceil(-offset / s) for offset < 0
    o1 = min(n_out, (size - 1 - offset) // s + 1) if size - 1 - offset >= 0 else 0
    o1 = max(o0, o1)
    return o0, o1, s * o0 + offset


def _im2col(x, kh, kw, s, pads, Ho, Wo):
    """cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j], returned as (K, N*L).

    On NumPy x_pad is never built: each kernel offset (i, j) copies the part of x it sees with one
    strided copy and writes zeros where it reads padding (this saves a full copy of x per conv). On
    CuPy, where each copy is a kernel launch, im2col_cuda does it in one (im2col_cuda.py), or with
    MINIDIFF_FUSED=0 _im2col_strided in three array ops. The batch sits
    inside the column index, so a whole (chunk of the) batch is ONE 2-D BLAS matmul (K, N*L).
    """
    xp = get_array_module(x)
    if xp is not np and backend.FUSED:
        return im2col_cuda(xp, x, kh, kw, s, pads, Ho, Wo)
    if xp is not np:
        return _im2col_strided(x, kh, kw, s, pads, Ho, Wo)
    N, C, H, W = x.shape
    pt, _, pl, _ = pads
    xc = x.transpose(1, 0, 2, 3)  # (C, N, H, W) view
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    col_taps = [_taps(j - pl, s, W, Wo) for j in range(kw)]
    for i in range(kh):
        a0, a1, r0 = _taps(i - pt, s, H, Ho)  # output rows [a0, a1) read input rows r0, r0 + s, ...
        for j, (b0, b1, c0) in enumerate(col_taps):
            dst = cols[:, i, j]  # (C, N, Ho, Wo)
            for zero in (dst[:, :, :a0], dst[:, :, a1:], dst[:, :, a0:a1, :b0], dst[:, :, a0:a1, b1:]):
                if zero.size:
                    zero[...] = 0  # the taps that read the zero padding
            dst[:, :, a0:a1, b0:b1] = xc[:, :, r0:r0 + s * (a1 - a0):s, c0:c0 + s * (b1 - b0):s]
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def _im2col_strided(x, kh, kw, s, pads, Ho, Wo):
    """_im2col's columns in three array ops (a kernel launch each on a GPU) instead of up to five per
    tap: x_pad (C, N, H + pt + pb, W + pl + pr) zeroed and filled, then one copy of the strided view
    cols[c, i, j, n, oh, ow] = x_pad[c, n, s*oh + i, s*ow + j] (every tap of every position at once)."""
    xp = get_array_module(x)
    N, C, H, W = x.shape
    pt, pb, pl, pr = pads
    x_pad = xp.zeros((C, N, H + pt + pb, W + pl + pr), dtype=x.dtype)
    x_pad[:, :, pt:pt + H, pl:pl + W] = x.transpose(1, 0, 2, 3)
    sc, sn, sh, sw = x_pad.strides  # bytes
    taps = xp.lib.stride_tricks.as_strided(x_pad, shape=(C, kh, kw, N, Ho, Wo),
                                           strides=(sc, sh, sw, sn, s * sh, s * sw))  # a view: no copy yet
    return xp.ascontiguousarray(taps).reshape(C * kh * kw, N * Ho * Wo)


def _col2im(dcols, x_shape, s, pads, Ho, Wo):
    """The adjoint of _im2col: dx_c[c, n, r, q] = sum of dcols[c, i, j, n, oh, ow] over the taps that
    copied x[n, c, r, q] (overlaps summed, padding taps dropped). Returns dx (C, N, H, W), channel-major."""
    xp = get_array_module(dcols)
    if xp is not np and backend.FUSED:  # the loop below in one CuPy kernel (im2col_cuda.py)
        return col2im_cuda(xp, dcols, x_shape, s, pads, Ho, Wo)
    N, C, H, W = x_shape
    _, kh, kw = dcols.shape[:3]
    pt, _, pl, _ = pads
    dx_c = xp.zeros((C, N, H, W), dtype=dcols.dtype)
    for i in range(kh):
        a0, a1, r0 = _taps(i - pt, s, H, Ho)
        for j in range(kw):
            b0, b1, c0 = _taps(j - pl, s, W, Wo)
            # forward: cols[:, i, j, :, a0:a1, b0:b1] = x_c[:, :, r0::s, c0::s] (the taps inside x)
            dx_c[:, :, r0:r0 + s * (a1 - a0):s, c0:c0 + s * (b1 - b0):s] += dcols[:, i, j, :, a0:a1, b0:b1]
    return dx_c
