"""2-D convolution (cross-correlation, as PyTorch's F.conv2d), forward and hand-written backward.

Shape legend: N batch, C_in / C_out channels, H W input size, kh kw kernel size, s stride,
(pt, pb, pl, pr) zero padding top/bottom/left/right, Ho = (H + pt + pb - kh) // s + 1 and
Wo = (W + pl + pr - kw) // s + 1 output size, K = C_in*kh*kw patch length, L = Ho*Wo positions.

Two versions (llm.c's matmul_forward_naive, cs231n's fast_layers):
  conv2d_forward / conv2d_backward              im2col + one BLAS matmul per batch chunk (fast)
  conv2d_naive_forward / conv2d_naive_backward  explicit loops (slow, obviously right; conv2d_naive.py)
Tests check that both give the same numbers. conv2d_forward / conv2d_backward hand the U-Net's
wide 3x3 convs on NumPy to Winograd's F(2x2, 3x3) (winograd.py, same numbers up to rounding):
choose_lowering says which lowering runs.
"""

from __future__ import annotations

import numbers

import numpy as np

from .. import backend
from ..backend import get_array_module
from ._check import check_float, check_ndim, check_same_backend, check_shape
from .im2col import _col2im, _im2col
from ..fast.cuda.im2col import bias_nchw_cuda


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


# Columns of at most this many bytes are built at a time on NumPy: a batch chunk whose columns stay
# in the CPU cache between the im2col copy and the matmul that reads them (about 1.5x faster than one
# (K, N*L) matmul over the whole batch, and kh*kw times less memory). CuPy takes the whole batch at once.
CHUNK_BYTES = 2**21


def _chunks(x, K: int, L: int, chunk_bytes: int | None = None):
    """Slices of the batch axis, each with K * n * L entries of at most chunk_bytes (default CHUNK_BYTES; n >= 1)."""
    N = x.shape[0]
    if get_array_module(x) is not np:
        return [slice(0, N)]
    budget = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    n = max(1, min(N, budget // max(1, K * L * x.dtype.itemsize)))
    return [slice(n0, min(N, n0 + n)) for n0 in range(0, N, n)]


LOWERINGS = ("auto", "im2col", "winograd", "matmul")
WINOGRAD_MIN_CHANNELS = 32  # below this Winograd's transforms cost more than its GEMMs save


def choose_lowering(x, w, s: int, pads: tuple, lowering: str = "auto") -> str:
    """'winograd' or 'im2col' for this conv (lowering: auto, im2col or winograd).

    auto picks matmul for a 1x1, stride 1, padding 0 conv (no im2col copy, no transposes) and
    Winograd F(2x2, 3x3) for a 3x3, stride 1, padding 1 conv with at least
    WINOGRAD_MIN_CHANNELS channels in and out on NumPy: measured 1.3-2.0x faster forward and
    1.4-2.2x backward on the U-Net's shapes (docs/performance.md). It loses where a side has few
    channels (conv_in from 3 channels: 2.4x slower). CuPy keeps im2col (one GEMM for the batch).
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
    if lowering == "auto":
        wide = min(w.shape[0], w.shape[1]) >= WINOGRAD_MIN_CHANNELS
        if pointwise:
            return "matmul"
        return "winograd" if fits and wide and get_array_module(x) is np else "im2col"
    return lowering


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

    Two array ops (the add in place on the contiguous product, then the transposing copy); on CuPy one
    kernel that does both (im2col_cuda.bias_nchw_cuda, the same numbers), unless MINIDIFF_FUSED=0."""
    xp = get_array_module(y_col)
    if xp is not np and backend.FUSED and y_col.size < 2**31:
        return bias_nchw_cuda(xp, y_col, b, out)
    if b is not None:
        y_col += b[:, None]  # (C_out, n*L)
    out[...] = y_col.reshape(out.shape[1], out.shape[0], *out.shape[2:]).transpose(1, 0, 2, 3)


def conv2d_forward(x, w, b=None, stride=1, padding=0, lowering="auto"):
    """y[n, o, oh, ow] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, s*oh + i, s*ow + j]

    computed as y = w_col @ cols with cols = im2col(x_pad) (K, N*L) and w_col = w (C_out, K),
    one batch chunk at a time (see CHUNK_BYTES), or by Winograd (see choose_lowering).

    Inputs:  x (N, C_in, H, W), w (C_out, C_in, kh, kw), b (C_out,) or None, one float dtype;
             stride int >= 1; padding int p >= 0 (all sides) or (top, bottom, left, right);
             lowering: auto (by shape), im2col, winograd (3x3, stride 1, padding 1 only) or
             matmul (1x1, stride 1, padding 0 only: one matmul per sample, no im2col copy).
    Returns: y (N, C_out, Ho, Wo) in x's dtype, and the cache for conv2d_backward.
    """
    s, pads, Ho, Wo = _setup(x, w, b, stride, padding)
    lowering = choose_lowering(x, w, s, pads, lowering)
    if lowering == "winograd":
        from ..fast.cpu.winograd import winograd_conv3x3_forward  # noqa: PLC0415  (winograd.py imports this module)

        return winograd_conv3x3_forward(x, w, b)
    if lowering == "matmul":
        return _pointwise_forward(x, w, b), (x, w, b is not None, s, pads)
    xp = get_array_module(x)
    N = x.shape[0]
    C_out, _, kh, kw = w.shape
    w_col = w.reshape(C_out, -1)  # (C_out, K)
    y = xp.empty((N, C_out, Ho, Wo), dtype=x.dtype)
    for nb in _chunks(x, w_col.shape[1], Ho * Wo):
        cols = _im2col(x[nb], kh, kw, s, pads, Ho, Wo)  # (K, n*L)
        y_col = w_col @ cols  # (C_out, n*L)
        _add_bias_to_nchw(y_col, b, y[nb])  # y[nb] = y_col + b[:, None] as (n, C_out, Ho, Wo)
    cache = (
        x,  # (N, C_in, H, W) the input, not its columns: cols are kh*kw times bigger, so
            # backward rebuilds them (one strided copy) instead of holding them across the net
        w,  # (C_out, C_in, kh, kw) the weight: dcols = w_col^T @ dy needs it
        b is not None,  # whether there was a bias, so db can be None when b was None
        s,  # the stride, validated
        pads,  # (pt, pb, pl, pr) the zero padding, validated
    )
    return y, cache


def _dx_by_flipped_conv(w, s, pads) -> bool:
    """Whether conv2d_backward gathers dx as a conv of dy (True) or scatters it by col2im (False).

    For stride 1, dx = conv2d(dy, w_flip, padding = k - 1 - pads) with w_flip[c, o, i, j] =
    w[o, c, kh-1-i, kw-1-j]. Its columns have kh*kw*C_out rows where col2im's have kh*kw*C_in, its
    matmul has inner dim kh*kw*C_out instead of C_out, and a copy replaces col2im's kh*kw
    read-add-writes: 1.3-2x faster for the U-Net's 3x3 convs, unless C_out >> C_in (conv_in,
    C_in = 3). Needs stride 1 and every pad <= k - 1 (so that the new padding is >= 0).
    """
    C_out, C_in, kh, kw = w.shape
    pt, pb, pl, pr = pads
    return s == 1 and max(pt, pb) <= kh - 1 and max(pl, pr) <= kw - 1 and C_out <= 2 * C_in


def _backward_setup(dy, cache):
    """Unpack a conv cache and check dy's shape; shared by both backwards."""
    x, w, has_bias, s, pads = cache
    N, C_in, H, W = x.shape
    C_out, _, kh, kw = w.shape
    pt, pb, pl, pr = pads
    Ho, Wo = (H + pt + pb - kh) // s + 1, (W + pl + pr - kw) // s + 1
    check_shape("dy", dy, (N, C_out, Ho, Wo), "(N, C_out, Ho, Wo)")
    return x, w, has_bias, s, pads, Ho, Wo


def conv2d_backward(dy, cache, lowering="auto"):
    """dw = dy_col cols^T,   dcols = w_col^T dy_col,   dx = col2im(dcols),   db = sum_{n,oh,ow} dy

    with dy_col = dy as (C_out, N*L). col2im scatters each patch entry back to the pixel it was
    copied from, summing overlaps. For stride 1 (and C_out <= 2 C_in) the same dx is gathered
    instead: dx = conv2d(dy, w flipped in space, C_in and C_out swapped), see _dx_by_flipped_conv.
    Convs that choose_lowering gives to Winograd take winograd_conv3x3_backward (same cache).

    Inputs:  dy (N, C_out, Ho, Wo) upstream gradient; cache from conv2d_forward; lowering as there.
    Returns: dx (N, C_in, H, W), dw (C_out, C_in, kh, kw), db (C_out,) or None.
    """
    x, w, has_bias, s, pads, Ho, Wo = _backward_setup(dy, cache)
    lowering = choose_lowering(x, w, s, pads, lowering)
    if lowering == "winograd":
        from ..fast.cpu.winograd import winograd_conv3x3_backward  # noqa: PLC0415

        return winograd_conv3x3_backward(dy, cache)
    if lowering == "matmul":
        return _pointwise_backward(dy, x, w, has_bias)
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
    for nb in _chunks(x, w_col.shape[1], Ho * Wo):
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
