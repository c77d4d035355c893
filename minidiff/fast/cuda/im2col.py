"""im2col and col2im on CuPy, one kernel each (nn/im2col.py's formulas, computed entry by entry from
each entry's own index), where the reference's array ops take kh*kw + 2 launches each.
fast/conv.py calls these (and bias_nchw) on CuPy; the reference conv (nn/conv2d.py) never does.

    im2col   cols[c, i, j, n, oh, ow] = x[n, c, h, w] with h = s*oh + i - pt, w = s*ow + j - pl, 0 outside x
    bias_nchw  y[n, o, l] = ycol[o, n*L + l] + b[o]   (the conv's output: its bias and NCHW layout in one pass)
    col2im   dx[c, n, h, w] = sum over the taps (i, j) in order of dcols[c, i, j, n, oh, ow] with
             s*oh = h + pt - i and s*ow = w + pl - j, 0 <= oh < Ho, 0 <= ow < Wo

im2col is a copy and col2im adds each entry's taps in the order nn/im2col.py's loop adds them, so both
give the array ops' numbers exactly. A column matrix may pass 2^31 entries: im2col addresses memory in
64-bit integers, and col2im gets 32-bit indices only where every array has fewer than 2^31 entries.

Shape legend: N batch, C channels, H W input size, kh kw kernel size, s stride, pt pl the top and
left zero padding, Ho Wo output size.
"""

from __future__ import annotations

import numpy as np

_KERNELS: dict = {}  # name -> cupy.RawKernel / ElementwiseKernel, made on first use

# im2col as a raw kernel on a 3-d grid: blockIdx.y is the row k = (c, i, j) of cols and blockIdx.z the
# sample n (each looping on by the grid's size when K or N pass 65535), the threads run along the
# positions l = oh * Wo + ow; an entry costs one division (l by Wo) where an ElementwiseKernel split its
# flat index six ways. Measured on an H100 (small, batch 128, a sampling step's 28 im2cols, 2.7 GB of
# columns): 6.1 ms as an ElementwiseKernel with 64-bit indices, 5.1 ms with 32-bit ones, 5.2 ms as
# this kernel, so division was not what limits it; about 0.5 TB/s written, a sixth of the card's copy
# bandwidth, for reasons not yet profiled. This one is kept for its single kernel at any size.
# SCALAR: float or double.
GRID_YZ = 65535  # CUDA's limit on a grid's y and z sizes
_IM2COL = """
extern "C" __global__ void minidiff_im2col_SCALAR(const SCALAR* x, SCALAR* cols, const int N, const int C,
        const int H, const int W, const int kh, const int kw, const int s, const int pt, const int pl,
        const int Ho, const int Wo) {
    const int L = Ho * Wo;
    const int l = blockIdx.x * blockDim.x + threadIdx.x;
    if (l >= L) return;
    const int oh = l / Wo, ow = l - oh * Wo;
    for (int k = blockIdx.y; k < C * kh * kw; k += gridDim.y) {
        const int tj = k % kw, ti = (k / kw) % kh, c = k / (kw * kh);  // k = (c * kh + ti) * kw + tj
        const int h = s * oh + ti - pt, w = s * ow + tj - pl;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        for (int n = blockIdx.z; n < N; n += gridDim.z) {
            cols[((long long)k * N + n) * L + l] = inside ? x[(((long long)n * C + c) * H + h) * W + w] : (SCALAR)0;
        }
    }
}
"""
# col2im as an ElementwiseKernel, written once for two index types: {U} (sizes and indices, never
# negative) and {S}: 32-bit where every array has fewer than 2^31 entries, else 64-bit.
_COL2IM = """
{U} r = ({U})i;
const {U} w = r % W; r /= W;
const {U} h = r % H; r /= H;
const {U} n = r % N;
const {U} c = r / N;
T acc = 0;
for ({U} ti = 0; ti < kh; ++ti) {{
    if (h + pt < ti) continue;
    const {U} hs = h + pt - ti;  // s * oh
    if (hs % s != 0 || hs / s >= Ho) continue;
    for ({U} tj = 0; tj < kw; ++tj) {{
        if (w + pl < tj) continue;
        const {U} ws = w + pl - tj;  // s * ow
        if (ws % s != 0 || ws / s >= Wo) continue;
        acc += dcols[((((c * kh + ti) * kw + tj) * N + n) * Ho + hs / s) * Wo + ws / s];
    }}
}}
dx = acc;
"""
_BIAS_NCHW = """
unsigned int r = (unsigned int)i;
const unsigned int l = r % L; r /= L;
const unsigned int o = r % C;
const unsigned int k = r / C;
const T v = ycol[(o * n + k) * L + l];
y = has_bias ? (T)(v + b[o]) : v;
"""
_INDEX_TYPES = {"": ("int64", "ptrdiff_t", "ptrdiff_t"), "32": ("uint32", "unsigned int", "int")}  # suffix: param, U, S
_SIZES = "N, C, H, W, kh, kw, s, pt, pl, Ho, Wo"


def _kernels(xp) -> dict:
    if not _KERNELS:
        for suffix, (param, u, signed) in _INDEX_TYPES.items():
            sizes = ", ".join(f"{param} {v}" for v in _SIZES.split(", "))
            _KERNELS["col2im" + suffix] = xp.ElementwiseKernel(  # i: the flat index into dx (C, N, H, W)
                "raw T dcols, " + sizes, "T dx", _COL2IM.format(U=u, S=signed), "minidiff_col2im" + suffix)
        for scalar in ("float", "double"):
            _KERNELS["im2col_" + scalar] = xp.RawKernel(_IM2COL.replace("SCALAR", scalar), "minidiff_im2col_" + scalar)
        _KERNELS["bias_nchw32"] = xp.ElementwiseKernel(  # i: the flat index into y (n, C, L)
            "raw T ycol, raw T b, uint32 C, uint32 n, uint32 L, bool has_bias", "T y", _BIAS_NCHW,
            "minidiff_bias_nchw32")
    return _KERNELS


def _bits(*arrays) -> str:
    """The kernels' suffix: "32" when every array's flat index fits a signed 32-bit int, else "" (64-bit)."""
    return "32" if max(a.size for a in arrays) < 2**31 else ""


def im2col_cuda(xp, x, kh: int, kw: int, s: int, pads, Ho: int, Wo: int):
    """nn/im2col.py's im2col on CuPy in one kernel: x (N, C, H, W) -> cols (K, N*L), K = C*kh*kw, L = Ho*Wo."""
    N, C, H, W = x.shape
    pt, _, pl, _ = pads
    L, K = Ho * Wo, C * kh * kw
    cols = xp.empty((K, N * L), dtype=x.dtype)
    threads = min(256, -(-L // 32) * 32)  # whole warps, no more than the positions need
    grid = (-(-L // threads), min(K, GRID_YZ), min(N, GRID_YZ))
    kernel = _kernels(xp)["im2col_" + ("float" if x.dtype == np.float32 else "double")]
    i32 = np.int32
    kernel(grid, (threads,), (xp.ascontiguousarray(x), cols, i32(N), i32(C), i32(H), i32(W), i32(kh), i32(kw),
                              i32(s), i32(pt), i32(pl), i32(Ho), i32(Wo)))
    return cols


def col2im_cuda(xp, dcols, x_shape, s: int, pads, Ho: int, Wo: int):
    """nn/im2col.py's col2im on CuPy in one kernel (channel-major): dcols (C, kh, kw, N, Ho, Wo) -> dx (C, N, H, W)."""
    N, C, H, W = x_shape
    _, kh, kw = dcols.shape[:3]
    pt, _, pl, _ = pads
    dx = xp.empty((C, N, H, W), dtype=dcols.dtype)
    _kernels(xp)["col2im" + _bits(dcols, dx)](xp.ascontiguousarray(dcols), N, C, H, W, kh, kw, s, pt, pl, Ho, Wo, dx)
    return dx


def bias_nchw_cuda(xp, y_col, b, out) -> None:
    """out (n, C, Ho, Wo) = y_col (C, n*L) + b[:, None] in NCHW order, in one kernel: the conv's bias add
    and its copy from the matmul's layout, each entry added once as the array ops add it. y_col < 2^31 entries."""
    n, c = out.shape[:2]
    _kernels(xp)["bias_nchw32"](y_col, y_col if b is None else b, c, n, y_col.shape[1] // n, b is not None, out)
