"""The CPU (NumPy) side of the fast conv: batch chunks that fit the CPU cache, and im2col / col2im
without a padded copy of x. minidiff/fast/conv.py calls these; nn/im2col.py is the reference.

    cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j]                (im2col, as (K, N*L))
    dx[n, c, r, q] = sum of dcols[c, i, j, n, oh, ow] over s*oh + i - pt = r, s*ow + j - pl = q   (col2im)

Both give nn/im2col.py's numbers exactly: im2col is a copy, and col2im adds the same taps in the
same order (tests/fast/test_conv.py).

Shape legend: N batch, C channels, H W input size, kh kw kernel size, s stride, (pt, pb, pl, pr)
zero padding top/bottom/left/right, Ho Wo output size, K = C*kh*kw patch length, L = Ho*Wo.
"""

from __future__ import annotations

import numpy as np

from ...backend import get_array_module

# Columns of at most this many bytes are built at a time on NumPy: a batch chunk whose columns stay
# in the CPU cache between the im2col copy and the matmul that reads them (about 1.5x faster than one
# (K, N*L) matmul over the whole batch, and kh*kw times less memory). CuPy takes the whole batch at once.
CHUNK_BYTES = 2**21


def chunks(x, K: int, L: int, chunk_bytes: int | None = None):
    """Slices of the batch axis, each with K * n * L entries of at most chunk_bytes (default CHUNK_BYTES; n >= 1)."""
    N = x.shape[0]
    if get_array_module(x) is not np:
        return [slice(0, N)]
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = max(1, min(N, budget // max(1, K * L * x.dtype.itemsize)))
    return [slice(n0, min(N, n0 + n)) for n0 in range(0, N, n)]


def taps(offset: int, s: int, size: int, n_out: int) -> tuple:
    """Output rows o in [o0, o1) whose input row s*o + offset lies inside [0, size); the others read
    zero padding. Returns (o0, o1, r0): the range and its first input row r0 = s*o0 + offset."""
    o0 = max(0, -(offset // s) if offset < 0 else 0)  # ceil(-offset / s) for offset < 0
    o1 = min(n_out, (size - 1 - offset) // s + 1) if size - 1 - offset >= 0 else 0
    o1 = max(o0, o1)
    return o0, o1, s * o0 + offset


def im2col_taps(x, kh, kw, s, pads, Ho, Wo):
    """cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j], returned as (K, N*L).

    x_pad is never built: each kernel offset (i, j) copies the part of x it sees with one strided
    copy and writes zeros where it reads padding (this saves a full copy of x per conv).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    pt, _, pl, _ = pads
    xc = x.transpose(1, 0, 2, 3)  # (C, N, H, W) view
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    col_taps = [taps(j - pl, s, W, Wo) for j in range(kw)]
    for i in range(kh):
        a0, a1, r0 = taps(i - pt, s, H, Ho)  # output rows [a0, a1) read input rows r0, r0 + s, ...
        for j, (b0, b1, c0) in enumerate(col_taps):
            dst = cols[:, i, j]  # (C, N, Ho, Wo)
            for zero in (dst[:, :, :a0], dst[:, :, a1:], dst[:, :, a0:a1, :b0], dst[:, :, a0:a1, b1:]):
                if zero.size:
                    zero[...] = 0  # the taps that read the zero padding
            dst[:, :, a0:a1, b0:b1] = xc[:, :, r0:r0 + s * (a1 - a0):s, c0:c0 + s * (b1 - b0):s]
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def col2im_taps(dcols, x_shape, s, pads, Ho, Wo):
    """The adjoint of im2col_taps: dx_c[c, n, r, q] = sum of dcols[c, i, j, n, oh, ow] over the taps that
    copied x[n, c, r, q] (overlaps summed, padding taps dropped). dcols (C, kh, kw, N, Ho, Wo);
    returns dx (C, N, H, W), channel-major."""
    xp = get_array_module(dcols)
    N, C, H, W = x_shape
    _, kh, kw = dcols.shape[:3]
    pt, _, pl, _ = pads
    dx_c = xp.zeros((C, N, H, W), dtype=dcols.dtype)
    for i in range(kh):
        a0, a1, r0 = taps(i - pt, s, H, Ho)
        for j in range(kw):
            b0, b1, c0 = taps(j - pl, s, W, Wo)
            # forward: cols[:, i, j, :, a0:a1, b0:b1] = x_c[:, :, r0::s, c0::s] (the taps inside x)
            dx_c[:, :, r0:r0 + s * (a1 - a0):s, c0:c0 + s * (b1 - b0):s] += dcols[:, i, j, :, a0:a1, b0:b1]
    return dx_c
