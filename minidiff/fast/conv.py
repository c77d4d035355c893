"""The fast 2-D convolution: nn/conv2d.py's conv2d and nn/resample.py's downsample with the same
signatures, caches and numbers (up to rounding), lowered by shape and backend (choose_lowering):

    NumPy  im2col without a padded copy, one batch chunk at a time (fast/cpu/conv_lowering.py);
           Winograd F(2x2, 3x3) for wide 3x3 convs (fast/cpu/winograd.py); a stride-1 conv to fewer
           channels than it reads by one GEMM of all taps and shifted adds (fast/cpu/conv_kn2row.py)
    CuPy   im2col, col2im and the bias add in NCHW order as one CUDA kernel each (fast/cuda/im2col.py)
    both   a 1x1 conv as one matmul per sample; dx for stride 1 gathered as a conv of dy with the
           flipped kernel instead of scattered by col2im (_dx_by_flipped_conv)

Every lowering is tested against the reference in float64 (tests/fast/test_conv.py, test_winograd.py).
The caches are the reference's, so either backward takes either forward's cache.

Shape legend: N batch, C_in / C_out channels, H W input size, kh kw kernel size, s stride,
(pt, pb, pl, pr) zero padding, Ho Wo output size, K = C_in*kh*kw patch length, L = Ho*Wo positions.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..nn.conv2d import _check_int, check_conv2d, check_conv2d_dy
from .cpu import conv_kn2row
from .cpu.conv_lowering import chunks, col2im_taps, im2col_taps
from .cpu.winograd import winograd_conv3x3_backward, winograd_conv3x3_forward
from .cuda.im2col import bias_nchw_cuda, col2im_cuda, im2col_cuda

LOWERINGS = ("auto", "im2col", "winograd", "matmul", "kn2row")
WINOGRAD_MIN_CHANNELS = 32  # below this Winograd's transforms cost more than its GEMMs save
WINOGRAD_MIN_TILES = 128  # N * ceil(H/2) * ceil(W/2) below this: im2col's one GEMM beats 16 thin ones


def conv2d_forward(x, w, b=None, stride=1, padding=0):
    """nn/conv2d.py's conv2d_forward (y = w_col @ im2col(x_pad) + b), lowered by choose_lowering."""
    return lowered_forward(x, w, b, stride, padding, lowering="auto")


def conv2d_backward(dy, cache):
    """nn/conv2d.py's conv2d_backward (dw = dy_col cols^T, dx = col2im(w_col^T dy_col), db = sum dy), lowered."""
    return lowered_backward(dy, cache, lowering="auto")


def downsample_forward(x, w, b, padding=1):
    """nn/resample.py's downsample_forward, y = conv2d(x, w, b, stride=2, padding), with this module's conv."""
    p = _check_int("padding", padding, 0)
    pads = (0, 1, 0, 1) if p == 0 else p  # padding 0: diffusers' F.pad(x, (0, 1, 0, 1))
    return conv2d_forward(x, w, b, stride=2, padding=pads)  # the conv's cache, as the reference keeps it


def downsample_backward(dy, cache):
    """nn/resample.py's downsample_backward: the stride-2 conv's backward."""
    return conv2d_backward(dy, cache)


def choose_lowering(x, w, s: int, pads: tuple, lowering: str = "auto") -> str:
    """'winograd', 'matmul', 'kn2row' or 'im2col' for this conv (lowering: auto or one of those).

    auto picks matmul for a 1x1, stride 1, padding 0 conv (no im2col copy, no transposes) and
    Winograd F(2x2, 3x3) for a 3x3, stride 1, padding 1 conv with at least
    WINOGRAD_MIN_CHANNELS channels in and out on NumPy: measured 1.3-2.0x faster forward and
    1.4-2.2x backward on the U-Net's shapes (docs/performance.md). It loses where a side has few
    channels (conv_in from 3 channels: 2.4x slower), and where the batch has fewer than
    WINOGRAD_MIN_TILES 2x2 tiles (16 GEMMs of so few rows run slowly: at 4x4, batch 4, 256 channels
    im2col takes 1.0 + 2.6 ms forward + backward against 3.2 + 4.8; at 128 tiles the two are within
    10 %): those wide convs take im2col. Other stride-1 convs to fewer channels than they read take
    kn2row on NumPy (conv_out, 32 -> 3 channels at 32x32, batch 64: forward 13.6 -> 3.6 ms).
    CuPy keeps im2col (one GEMM for the batch).
    """
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering must be one of {LOWERINGS}, got {lowering!r}")
    fits = tuple(w.shape[2:]) == (3, 3) and s == 1 and tuple(pads) == (1, 1, 1, 1)
    if lowering == "winograd" and not fits:
        raise ValueError(f"lowering='winograd' needs a 3x3 kernel, stride 1 and padding 1, got kernel "
                         f"{tuple(w.shape[2:])}, stride {s}, padding {tuple(pads)}")
    pointwise = tuple(w.shape[2:]) == (1, 1) and s == 1 and tuple(pads) == (0, 0, 0, 0)
    if lowering == "matmul" and not pointwise:
        raise ValueError(f"lowering='matmul' needs a 1x1 kernel, stride 1 and padding 0, got kernel "
                         f"{tuple(w.shape[2:])}, stride {s}, padding {tuple(pads)}")
    if lowering == "kn2row" and not conv_kn2row.applies(x, w, s, pads):
        raise ValueError(f"lowering='kn2row' needs NumPy arrays, stride 1 and every pad <= kernel size - 1, got "
                         f"kernel {tuple(w.shape[2:])}, stride {s}, padding {tuple(pads)}")
    if lowering == "auto":
        wide = min(w.shape[0], w.shape[1]) >= WINOGRAD_MIN_CHANNELS
        tiles = x.shape[0] * ((x.shape[2] + 1) // 2) * ((x.shape[3] + 1) // 2)
        if pointwise:
            return "matmul"
        if fits and wide and get_array_module(x) is np:
            return "winograd" if tiles >= WINOGRAD_MIN_TILES else "im2col"
        return "kn2row" if conv_kn2row.pays(x, w, s, pads) else "im2col"
    return lowering


def _im2col(x, kh, kw, s, pads, Ho, Wo):
    """cols[c, i, j, n, oh, ow] = x_pad[n, c, s*oh + i, s*ow + j] as (K, N*L): one strided copy per tap
    on NumPy (no padded copy of x), one kernel on CuPy (where each copy would be a launch)."""
    xp = get_array_module(x)
    if xp is np:
        return im2col_taps(x, kh, kw, s, pads, Ho, Wo)
    return im2col_cuda(xp, x, kh, kw, s, pads, Ho, Wo)


def _col2im(dcols, x_shape, s, pads, Ho, Wo):
    """The adjoint of _im2col: dcols (C, kh, kw, N, Ho, Wo) -> dx (C, N, H, W), channel-major."""
    xp = get_array_module(dcols)
    if xp is np:
        return col2im_taps(dcols, x_shape, s, pads, Ho, Wo)
    return col2im_cuda(xp, dcols, x_shape, s, pads, Ho, Wo)


def _pointwise_forward(x, w, b):
    """A 1x1 conv as one matmul per sample, straight in NCHW: y_n = w (C_out, C_in) @ x_n (C_in, H*W)."""
    N, C_in, H, W = x.shape
    y = w.reshape(w.shape[0], C_in) @ x.reshape(N, C_in, H * W)  # (N, C_out, L) broadcast over N
    if b is not None:
        y += b[:, None]
    return y.reshape(N, -1, H, W)


def _pointwise_backward(dy, x, w, has_bias):
    """Backward of _pointwise_forward: dx_n = w^T dy_n, dw = sum_n dy_n x_n^T, db = sum dy."""
    N, C_in, H, W = x.shape
    C_out = w.shape[0]
    dy3 = dy.reshape(N, C_out, H * W)  # (N, C_out, L)
    # forward: y_n = w @ x_n (+ b)
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    dw = (dy3 @ x.reshape(N, C_in, H * W).transpose(0, 2, 1)).sum(axis=0)  # (C_out, C_in)
    dx = w.reshape(C_out, C_in).T @ dy3  # (N, C_in, L)
    return dx.reshape(x.shape), dw.reshape(w.shape), db


def _add_bias_to_nchw(y_col, b, out):
    """out (n, C_out, Ho, Wo) = y_col (C_out, n*L) + b[:, None], moved into NCHW order.

    Two array ops on NumPy (the add in place on the contiguous product, then the transposing copy);
    on CuPy one kernel that does both (bias_nchw_cuda, the same numbers) where y_col < 2^31 entries."""
    xp = get_array_module(y_col)
    if xp is not np and y_col.size < 2**31:
        return bias_nchw_cuda(xp, y_col, b, out)
    if b is not None:
        y_col += b[:, None]  # (C_out, n*L)
    out[...] = y_col.reshape(out.shape[1], out.shape[0], *out.shape[2:]).transpose(1, 0, 2, 3)


def lowered_forward(x, w, b=None, stride=1, padding=0, *, lowering="auto"):
    """conv2d_forward by the given lowering (auto: choose_lowering's): y = w_col @ cols + b, one batch
    chunk at a time (see conv_lowering.CHUNK_BYTES), or by Winograd, or as a 1x1 matmul."""
    s, pads, Ho, Wo = check_conv2d(x, w, b, stride, padding)
    lowering = choose_lowering(x, w, s, pads, lowering)
    if lowering == "winograd":
        return winograd_conv3x3_forward(x, w, b)
    if lowering == "matmul":
        return _pointwise_forward(x, w, b), (x, w, b is not None, s, pads)
    if lowering == "kn2row":
        return conv_kn2row.kn2row_forward(x, w, b, pads, Ho, Wo), (x, w, b is not None, s, pads)
    xp = get_array_module(x)
    N = x.shape[0]
    C_out, _, kh, kw = w.shape
    w_col = w.reshape(C_out, -1)  # (C_out, K)
    y = xp.empty((N, C_out, Ho, Wo), dtype=x.dtype)
    for nb in chunks(x, w_col.shape[1], Ho * Wo):
        cols = _im2col(x[nb], kh, kw, s, pads, Ho, Wo)  # (K, n*L)
        y_col = w_col @ cols  # (C_out, n*L)
        _add_bias_to_nchw(y_col, b, y[nb])  # y[nb] = y_col + b[:, None] as (n, C_out, Ho, Wo)
    cache = (x, w, b is not None, s, pads)  # nn/conv2d.py's cache: x, not the columns (kh*kw times bigger)
    return y, cache


def _dx_by_flipped_conv(w, s, pads) -> bool:
    """Whether the backward gathers dx as a conv of dy (True) or scatters it by col2im (False).

    For stride 1, dx = conv2d(dy, w_flip, padding = k - 1 - pads) with w_flip[c, o, i, j] =
    w[o, c, kh-1-i, kw-1-j]. Its columns have kh*kw*C_out rows where col2im's have kh*kw*C_in, its
    matmul has inner dim kh*kw*C_out instead of C_out, and a copy replaces col2im's kh*kw
    read-add-writes: 1.3-2x faster for the U-Net's 3x3 convs, unless C_out >> C_in (conv_in,
    C_in = 3). Needs stride 1 and every pad <= k - 1 (so that the new padding is >= 0).
    """
    C_out, C_in, kh, kw = w.shape
    pt, pb, pl, pr = pads
    return s == 1 and max(pt, pb) <= kh - 1 and max(pl, pr) <= kw - 1 and C_out <= 2 * C_in


def lowered_backward(dy, cache, *, lowering="auto"):
    """conv2d_backward by the given lowering: dw = dy_col cols^T, dcols = w_col^T dy_col,
    dx = col2im(dcols) (or, see _dx_by_flipped_conv, dx gathered as a conv of dy), db = sum dy,
    one batch chunk at a time; Winograd's and the 1x1 matmul's backwards where those lowerings apply."""
    x, w, has_bias, s, pads = cache
    Ho, Wo = check_conv2d_dy(dy, cache)
    lowering = choose_lowering(x, w, s, pads, lowering)
    if lowering == "winograd":
        return winograd_conv3x3_backward(dy, cache)
    if lowering == "matmul":
        return _pointwise_backward(dy, x, w, has_bias)
    if lowering == "kn2row":
        return conv_kn2row.kn2row_backward(dy, x, w, has_bias, pads)
    xp = get_array_module(dy, x)
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    w_col = w.reshape(C_out, -1)  # (C_out, K)
    gather = _dx_by_flipped_conv(w, s, pads)
    if gather:
        w_flip = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(C_in, -1)  # (C_in, C_out*kh*kw), a copy
        flip_pads = (kh - 1 - pt, kh - 1 - pb, kw - 1 - pl, kw - 1 - pr)

    # forward: y_col += b[:, None]
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    dt = xp.result_type(dy.dtype, w.dtype)  # the dtype the matmuls give (dy's and x's, normally equal)
    dw_col = None  # (K, C_out), summed over the chunks (the first chunk's product starts the sum)
    dx = xp.empty(x.shape, dtype=dt)  # (N, C_in, H, W), filled chunk by chunk
    for nb in chunks(x, w_col.shape[1], Ho * Wo):
        # forward: y_col = w_col @ cols,  y[nb] = y_col as (n, C_out, Ho, Wo)
        dy_col = xp.ascontiguousarray(dy[nb].transpose(1, 0, 2, 3)).reshape(C_out, -1)  # (C_out, n*L)
        cols = _im2col(x[nb], kh, kw, s, pads, Ho, Wo)  # (K, n*L), rebuilt (see the cache note)
        # dw = dy_col @ cols^T, evaluated as (cols @ dy_col^T)^T: same numbers, but OpenBLAS is several
        # times faster when the long n*L axis is the inner dimension of a row-major (K, n*L) operand
        dw_part = cols @ dy_col.T  # (K, C_out)
        if dw_col is None:
            dw_col = dw_part  # one chunk, as always on CuPy: no zero-fill and no add
        else:
            dw_col += dw_part
        if gather:
            # dx[n, c, r, q] = sum_{o, i, j} w[o, c, i, j] dy_pad'[n, o, r + kh-1-i, q + kw-1-j]
            dx_c = (w_flip @ _im2col(dy[nb], kh, kw, 1, flip_pads, H, W)).reshape(C_in, -1, H, W)
        else:
            dcols = (w_col.T @ dy_col).reshape(C_in, kh, kw, -1, Ho, Wo)  # (K, n*L) as patches
            # forward: cols[:, i, j] = x_pad[:, :, i:i + s * Ho:s, j:j + s * Wo:s]   (col2im, overlaps summed)
            dx_c = _col2im(dcols, x[nb].shape, s, pads, Ho, Wo)  # (C_in, n, H, W)
        dx[nb] = dx_c.transpose(1, 0, 2, 3)  # (n, C_in, H, W)
    dw = dw_col.T.reshape(w.shape)  # (C_out, C_in, kh, kw)
    return dx, dw, db
