"""im2col and its adjoint col2im: every kernel patch of a zero-padded image copied into a column,
so that a convolution is one matrix product (conv2d.py), and the columns' gradients summed back.

    cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j]                      (im2col, as (K, N*L))
    dx_pad[n, c, s*oh + i, s*ow + j] += dcols[c, i, j, n, oh, ow]   for every tap   (col2im, overlaps summed)

Shape legend: N batch, C channels, H W input size, kh kw kernel size, s stride, (pt, pb, pl, pr)
zero padding top/bottom/left/right, Ho Wo output size, K = C*kh*kw patch length, L = Ho*Wo positions.

The batch sits inside the column index (the columns are (K, N*L)), so a whole batch is ONE 2-D matmul.
Both loop over the kh*kw kernel taps (i, j): tap (i, j) of every patch is one strided slice of x_pad.
The faster versions (no padded copy, one CUDA kernel each) are in minidiff/fast/.
"""

from __future__ import annotations

from ..backend import get_array_module


def im2col(x, kh: int, kw: int, s: int, pads: tuple):
    """cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j]

    Inputs:  x (N, C, H, W); kernel size kh, kw; stride s; pads (pt, pb, pl, pr).
    Returns: cols (K, N*L), rows ordered (c, i, j) like w.reshape(C_out, K), columns (n, oh, ow).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    pt, pb, pl, pr = pads
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    x_pad = xp.zeros((C, N, H + pt + pb, W + pl + pr), dtype=x.dtype)  # channels first, as the rows of cols
    x_pad[:, :, pt:pt + H, pl:pl + W] = x.transpose(1, 0, 2, 3)
    cols = xp.empty((C, kh, kw, N, Ho, Wo), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, i, j] = x_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s]  # (C, N, Ho, Wo): tap (i, j) of every patch
    return cols.reshape(C * kh * kw, N * Ho * Wo)


def col2im(dcols, x_shape: tuple, kh: int, kw: int, s: int, pads: tuple):
    """dx[n, c, r, q] = sum of dcols[c, i, j, n, oh, ow] over the taps with s*oh + i = r + pt, s*ow + j = q + pl

    The adjoint of im2col: each column entry goes back to the pixel it was copied from; where
    patches overlap (kernel larger than the stride) their gradients add up; taps that read the
    zero padding land in dx_pad's border and are dropped.

    Inputs:  dcols (K, N*L); x_shape (N, C, H, W); kh, kw, s, pads as for im2col.
    Returns: dx (N, C, H, W).
    """
    xp = get_array_module(dcols)
    N, C, H, W = x_shape
    pt, pb, pl, pr = pads
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    dcols = dcols.reshape(C, kh, kw, N, Ho, Wo)
    dx_pad = xp.zeros((C, N, H + pt + pb, W + pl + pr), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            # forward: cols[:, i, j] = x_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s]
            dx_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s] += dcols[:, i, j]
    # forward: x_pad[:, :, pt:pt + H, pl:pl + W] = x.transpose(1, 0, 2, 3)   (pt:pt + H, not pt:-pb: pads may be 0)
    return xp.ascontiguousarray(dx_pad[:, :, pt:pt + H, pl:pl + W].transpose(1, 0, 2, 3))  # (N, C, H, W)
