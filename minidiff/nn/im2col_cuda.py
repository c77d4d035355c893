"""im2col and col2im on CuPy, one kernel each (im2col.py's formulas, computed entry by entry from
each entry's own index), where the array-op versions take 3 and kh*kw + 1 launches. im2col.py calls
these on CuPy unless MINIDIFF_FUSED=0 (backend.FUSED).

    im2col   cols[c, i, j, n, oh, ow] = x[n, c, h, w] with h = s*oh + i - pt, w = s*ow + j - pl, 0 outside x
    col2im   dx[c, n, h, w] = sum over the taps (i, j) in order of dcols[c, i, j, n, oh, ow] with
             s*oh = h + pt - i and s*ow = w + pl - j, 0 <= oh < Ho, 0 <= ow < Wo

im2col is a copy and col2im adds each entry's taps in the order im2col.py's loop adds them, so both
give the array ops' numbers exactly. Indices are 64-bit (ptrdiff_t): a column matrix may pass 2^31.

Shape legend: N batch, C channels, H W input size, kh kw kernel size, s stride, pt pl the top and
left zero padding, Ho Wo output size.
"""

from __future__ import annotations

_KERNELS: dict = {}  # name -> cupy.ElementwiseKernel, made on first use


def _kernels(xp) -> dict:
    if not _KERNELS:
        _KERNELS["im2col"] = xp.ElementwiseKernel(  # i: the flat index into cols (C, kh, kw, N, Ho, Wo)
            "raw T x, int64 N, int64 C, int64 H, int64 W, int64 kh, int64 kw, int64 s, int64 pt, int64 pl, "
            "int64 Ho, int64 Wo", "T col",
            """
            ptrdiff_t r = i;
            const ptrdiff_t ow = r % Wo; r /= Wo;
            const ptrdiff_t oh = r % Ho; r /= Ho;
            const ptrdiff_t n = r % N; r /= N;
            const ptrdiff_t tj = r % kw; r /= kw;
            const ptrdiff_t ti = r % kh;
            const ptrdiff_t c = r / kh;
            const ptrdiff_t h = s * oh + ti - pt, w = s * ow + tj - pl;
            col = (h >= 0 && h < H && w >= 0 && w < W) ? x[((n * C + c) * H + h) * W + w] : (T)0;
            """, "minidiff_im2col")
        _KERNELS["col2im"] = xp.ElementwiseKernel(  # i: the flat index into dx (C, N, H, W)
            "raw T dcols, int64 N, int64 C, int64 H, int64 W, int64 kh, int64 kw, int64 s, int64 pt, int64 pl, "
            "int64 Ho, int64 Wo", "T dx",
            """
            ptrdiff_t r = i;
            const ptrdiff_t w = r % W; r /= W;
            const ptrdiff_t h = r % H; r /= H;
            const ptrdiff_t n = r % N;
            const ptrdiff_t c = r / N;
            T acc = 0;
            for (ptrdiff_t ti = 0; ti < kh; ++ti) {
                const ptrdiff_t hs = h + pt - ti;  // s * oh
                if (hs < 0 || hs % s != 0 || hs / s >= Ho) continue;
                for (ptrdiff_t tj = 0; tj < kw; ++tj) {
                    const ptrdiff_t ws = w + pl - tj;  // s * ow
                    if (ws < 0 || ws % s != 0 || ws / s >= Wo) continue;
                    acc += dcols[((((c * kh + ti) * kw + tj) * N + n) * Ho + hs / s) * Wo + ws / s];
                }
            }
            dx = acc;
            """, "minidiff_col2im")
    return _KERNELS


def im2col_cuda(xp, x, kh: int, kw: int, s: int, pads, Ho: int, Wo: int):
    """im2col.py's _im2col on CuPy in one kernel: x (N, C, H, W) -> cols (K, N*L), K = C*kh*kw, L = Ho*Wo."""
    N, C, H, W = x.shape
    pt, _, pl, _ = pads
    cols = xp.empty((C * kh * kw, N * Ho * Wo), dtype=x.dtype)
    _kernels(xp)["im2col"](xp.ascontiguousarray(x), N, C, H, W, kh, kw, s, pt, pl, Ho, Wo, cols)
    return cols


def col2im_cuda(xp, dcols, x_shape, s: int, pads, Ho: int, Wo: int):
    """im2col.py's _col2im on CuPy in one kernel: dcols (C, kh, kw, N, Ho, Wo) -> dx (C, N, H, W)."""
    N, C, H, W = x_shape
    _, kh, kw = dcols.shape[:3]
    pt, _, pl, _ = pads
    dx = xp.empty((C, N, H, W), dtype=dcols.dtype)
    _kernels(xp)["col2im"](xp.ascontiguousarray(dcols), N, C, H, W, kh, kw, s, pt, pl, Ho, Wo, dx)
    return dx
