"""3x3, stride 1, padding 1 convolution by Winograd's F(2x2, 3x3), forward and hand-written backward.

Shape legend: N batch, C_in / C_out channels, H W input (= output) size, th = ceil(H/2) and
tw = ceil(W/2) tiles per column / row, n the samples of one batch chunk, P = n*th*tw tiles,
a b in 0..3 the 16 transform-domain entries (k = 4a + b), r q in 0..1 the phase of a pixel
(row 2t + r, column 2s + q) of the padded input, whose 4x4 tile (t, s) starts at (2t, 2s).

Each 2x2 output tile is (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks")

    Y = A^T [ (G g G^T) * (B^T d B) ] A        d: 4x4 input tile, g: 3x3 kernel, *: elementwise

so that over all tiles and channels the conv is 16 batched GEMMs, M[k] = U[k] V[k] with
U = G g G^T (16, C_out, C_in) and V = B^T d B (16, C_in, P): 4 C_in C_out multiplies per output
pixel instead of im2col's 9. The transforms are a few whole-array adds on the padded input split
into its 4 phases x_ph[r, q, t, s, n, c] = x_pad[n, c, 2t + r, 2s + q], where a tile's row i is
phase i % 2 at tile row t + i // 2: shifted slices, never a loop over tiles.

The arrays of tiles are channels last, (..., t, s, n, c) in memory, so that every shifted slice runs
n*C contiguous floats; V and M are stored transposed, (16, P, C), and the GEMMs are M^T = V U^T.
A tiles-last layout (..., c, n, t, s) saves the transposed copies of x and y, but its slices run
only tw floats (2 to 16): it was 2-5x slower below 32x32 and no faster at 32x32.
The result is exact up to rounding, equal to conv2d_forward / conv2d_backward(stride=1, padding=1),
and the caches are alike: each backward takes the other forward's cache.
"""

from __future__ import annotations

import numpy as np

from ...backend import get_array_module
from ...nn.conv2d import check_conv2d, check_conv2d_dy
from .conv_lowering import chunks as conv_chunks

G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])  # (4, 3); B^T and A^T are in _bt, _at
GG = np.einsum("ai,bj->abij", G, G).reshape(16, 9)  # U[a, b] = sum_ij G[a, i] g[i, j] G[b, j], as one matmul
SIGN = np.array([-1.0 if (a == 3) != (b == 3) else 1.0 for a in range(4) for b in range(4)])  # (16,) see _output_transform_adjoint

# Batch chunks of at most this many bytes of V and M are transformed at a time on NumPy, so that
# they stay in the CPU cache between the transforms and the GEMMs (as conv_lowering.CHUNK_BYTES).
CHUNK_BYTES = 2**21  # 2**20 was as fast on one thread; 2**21 is 2-3 % faster with two shards


COPY_CHANNELS = 16  # channels per copy in _to_channels_last


def _chunks(x, C_in: int, C_out: int, tiles: int, backward: bool = False):
    """Slices of the batch axis with 16 (C_in + C_out) n tiles entries (V and M) of at most CHUNK_BYTES (n >= 1).

    The backward holds about twice the forward's arrays per tile (dM, V, dV and the adjoint's rows), so it
    takes half as many samples at a time: 3.1-3.4 % less backward time than CHUNK_BYTES at 16x16 and 32x32
    (one thread; half again was 3-12 % slower)."""
    return conv_chunks(x, 16 * (C_in + C_out), tiles, CHUNK_BYTES // 2 if backward else CHUNK_BYTES)


def _bt(d0, d1, d2, d3, out):
    """out[a] = sum_i B^T[a, i] d_i: (d0 - d2, d1 + d2, d2 - d1, d1 - d3), the rows of
    B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]] applied along one axis."""
    xp = get_array_module(out)
    xp.subtract(d0, d2, out=out[0])
    xp.add(d1, d2, out=out[1])
    xp.subtract(d2, d1, out=out[2])
    xp.subtract(d1, d3, out=out[3])


def _bt_adjoint(dv, even, odd, axis: int):
    """The adjoint of _bt(even[:L], odd[:L], even[1:], odd[1:], out), where even and odd have length L + 1
    along `axis`: dv = d out (4, ...); even and odd are overwritten with their gradients."""
    xp = get_array_module(even)
    first, rest, last, lo, hi = ((slice(None),) * axis + (sl,) for sl in
                                 (slice(0, 1), slice(1, -1), slice(-1, None), slice(None, -1), slice(1, None)))
    # forward: out[0] = d0 - d2, out[1] = d1 + d2, out[2] = d2 - d1, out[3] = d1 - d3 with d0, d1 = even, odd at
    # tile s and d2, d3 = even, odd at s + 1, so even[s] gets d d0 from tile s and d d2 from tile s - 1
    dd2 = xp.add(dv[1], dv[2])  # d d2 = dv1 + dv2 - dv0
    dd2 -= dv[0]
    dd1 = xp.subtract(dv[1], dv[2])  # d d1 = dv1 - dv2 + dv3
    dd1 += dv[3]
    even[first] = dv[0][first]  # d d0 = dv0
    xp.add(dv[0][hi], dd2[lo], out=even[rest])
    even[last] = dd2[last]
    odd[first] = dd1[first]
    xp.subtract(dd1[hi], dv[3][lo], out=odd[rest])  # d d3 = -dv3
    xp.negative(dv[3][last], out=odd[last])


def _at(m, out):
    """out[r] = sum_a A^T[r, a] m[a] along the first axis, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]."""
    xp = get_array_module(out)
    xp.add(m[0], m[1], out=out[0])
    out[0] += m[2]
    xp.subtract(m[1], m[2], out=out[1])
    out[1] -= m[3]


def _output_transform_adjoint(dy, dM):
    """dM = A dY A^T per tile (the adjoint of Y = A^T M A, y = the tiles of Y cropped), for dy (n, C_out, H, W),
    written into dM (4, 4, th, tw, n, C_out) as SIGN[k] dM[k] (k = 4a + b).

    Along each axis the adjoint of A^T = [[1, 1, 1, 0], [0, 1, -1, -1]] maps (d0, d1) to (dm0, dm1, dm2, dm3) =
    (d0, d0 + d1, d0 - d1, -d1). Keeping -dm3 instead of dm3 makes entries 0 and 3 plain copies of the two
    phases of dy, so dy's phases are copied once, straight into the slots a, b in (0, 3), and entries 1 and 2
    are one add or subtract each: 4 array ops, where applying the adjoint along b, then a, took 8 (two of
    them copies, two negations) and a copy of dy. The numbers are the same up to the exact sign flips:
    the backward multiplies by SIGN[k] U[k] and SIGN[k] the sum for dU (5.8 % less backward time at 32x32).
    """
    xp = get_array_module(dM)
    _to_phases(dy, dM[::3, ::3], 0)  # entries a, b in (0, 3); the pixels the forward cropped get no gradient
    ends = dM[::3]  # (2, 4, ...): a in (0, 3), along b
    xp.add(ends[:, 0], ends[:, 3], out=ends[:, 1])  # dm1 = d0 + d1 (entry 3 holds d1 = -dm3)
    xp.subtract(ends[:, 0], ends[:, 3], out=ends[:, 2])  # dm2 = d0 - d1
    xp.add(dM[0], dM[3], out=dM[1])  # the same along a
    xp.subtract(dM[0], dM[3], out=dM[2])


def _to_channels_last(x, out):
    """out[h, v, n, c] = x[n, c, h, v]: x (n, C, H, W) copied into out (H, W, n, C), any view."""
    xp = get_array_module(x)
    C, H, W = x.shape[1:]
    # the copy reads x with a stride of H*W floats and NumPy's copy loop runs along the channels; copying
    # 16 channels at a time keeps the lines it reads in L1 (at 4 KiB strides they fall in one L1 set). 16
    # was the fastest grouping of 4, 8, 16, all: 1.2x faster than 8 at 32x32, 2x faster than all at 16x16
    step = COPY_CHANNELS if xp is np else C
    for c in range(0, C, step):
        out[..., c:c + step] = x[:, c:c + step].transpose(2, 3, 0, 1)


def _spans(size: int, offset: int):
    """For phases r = 0, 1 of an axis where phase entry i holds pixel 2i + r - offset of an axis of `size`
    pixels: (first pixel, first entry, count) of the entries that hold a pixel (the others are padding)."""
    return [((r - offset) % 2, ((r - offset) % 2 + offset - r) // 2, (size - (r - offset) % 2 + 1) // 2) for r in (0, 1)]


def _to_phases(x, out, offset: int):
    """out[r, q, i, j, n, c] = x[n, c, 2i + r - offset, 2j + q - offset], 0 outside x: x (n, C, H, W), out
    (2, 2, I, J, n, C), any view. offset 1 gives the phases of x padded by one zero on the top and left."""
    H, W = x.shape[2:]
    for r, (h0, i0, rows) in enumerate(_spans(H, offset)):
        for q, (v0, j0, cols) in enumerate(_spans(W, offset)):
            dst = out[r, q]  # (I, J, n, C)
            for zero in (dst[:i0], dst[i0 + rows:], dst[i0:i0 + rows, :j0], dst[i0:i0 + rows, j0 + cols:]):
                zero[...] = 0
            _to_channels_last(x[:, :, h0::2, v0::2], dst[i0:i0 + rows, j0:j0 + cols])


def _from_phases(ph, y, offset: int):
    """y[n, c, h, v] = ph[r, q, i, j, n, c] at h = 2i + r - offset, v = 2j + q - offset for every pixel of y
    (n, C, H, W): the adjoint of _to_phases, dropping the padding. Four copies, one per phase, each from a
    contiguous block, so that the transform's adds before it write contiguous blocks too (with the
    copy, 1.3x faster than the adds writing the strided phases of a padded array and one copy of it)."""
    H, W = y.shape[2:]
    for r, (h0, i0, rows) in enumerate(_spans(H, offset)):
        for q, (v0, j0, cols) in enumerate(_spans(W, offset)):
            y[:, :, h0::2, v0::2] = ph[r, q, i0:i0 + rows, j0:j0 + cols].transpose(2, 3, 0, 1)


def _input_transform(x, th: int, tw: int):
    """V[a, b, t, s, n, c] = (B^T d B)[a, b] for the tile d = x_pad[n, c, 2t:2t + 4, 2s:2s + 4] of x (n, C_in, H, W)
    padded by one zero on the top and left and by 1 or 2 on the bottom and right (to an even size);
    returns V as the 16 GEMM operands (16, P, C_in)."""
    xp = get_array_module(x)
    n, C, H, W = x.shape
    x_ph = xp.empty((2, 2, th + 1, tw + 1, n, C), dtype=x.dtype)  # x_ph[r, q, i, j] = x_pad[2i + r, 2j + q]
    _to_phases(x, x_ph, 1)
    # row i of tile t is phase i % 2 of row t + i // 2, column j of tile s phase j % 2 of column s + j // 2
    rows = xp.empty((4, 2, th, tw + 1, n, C), dtype=x.dtype)  # (a, q, ...) B^T d
    _bt(x_ph[0, :, :-1], x_ph[1, :, :-1], x_ph[0, :, 1:], x_ph[1, :, 1:], rows)
    V = xp.empty((4, 4, th, tw, n, C), dtype=x.dtype)  # (a, b, ...) B^T d B
    _bt(rows[:, 0, :, :-1], rows[:, 1, :, :-1], rows[:, 0, :, 1:], rows[:, 1, :, 1:], V.transpose(1, 0, 2, 3, 4, 5))
    return V.reshape(16, -1, C)


def _input_transform_adjoint(dV, dx, th: int, tw: int):
    """The adjoint of _input_transform: dV (16, P, C_in) -> dx (n, C_in, H, W), written into dx
    (the tiles overlap by 2 rows and columns: their gradients add up)."""
    xp = get_array_module(dV)
    n, C, H, W = dx.shape
    dV = dV.reshape(4, 4, th, tw, n, C)
    # forward: V[:, b] = _bt over the tile columns of rows (a, q, th, tw + 1, n, C)
    drows = xp.empty((4, 2, th, tw + 1, n, C), dtype=dV.dtype)
    _bt_adjoint(dV.transpose(1, 0, 2, 3, 4, 5), drows[:, 0], drows[:, 1], axis=2)
    # forward: rows = _bt over the tile rows of x_ph (r, q, th + 1, tw + 1, n, C), the phases of x_pad
    dx_ph = xp.empty((2, 2, th + 1, tw + 1, n, C), dtype=dV.dtype)
    _bt_adjoint(drows, dx_ph[0], dx_ph[1], axis=1)
    # forward: x_ph = the phases of x padded (the padding gets no gradient)
    _from_phases(dx_ph, dx, 1)  # (n, C, H, W)


def winograd_conv3x3_forward(x, w, b=None):
    """y[n, o, h, v] = b[o] + sum_{c, i, j} w[o, c, i, j] * x_pad[n, c, h + i, v + j]   (x_pad: x padded by 1)

    computed per 2x2 output tile as Y = A^T [U * V] A with U = G w G^T and V = B^T d B, the sum over c
    as 16 batched GEMMs M = U V (16, C_out, P), one batch chunk at a time (see CHUNK_BYTES).

    Inputs:  x (N, C_in, H, W), w (C_out, C_in, 3, 3), b (C_out,) or None, one float dtype.
    Returns: y (N, C_out, H, W) in x's dtype, and the cache for winograd_conv3x3_backward; the same
             as conv2d_forward(x, w, b, stride=1, padding=1), whose backward takes this cache too.
    """
    check_conv2d(x, w, b, 1, 1)
    if w.shape[2:] != (3, 3):
        raise ValueError(f"w must have shape (C_out, C_in, 3, 3), got {tuple(w.shape)}")
    xp = get_array_module(x)
    N, C_in, H, W = x.shape
    C_out = w.shape[0]
    th, tw = (H + 1) // 2, (W + 1) // 2
    U = (xp.asarray(GG, dtype=w.dtype) @ w.reshape(C_out * C_in, 9).T).reshape(16, C_out, C_in)  # G w G^T
    UT = xp.ascontiguousarray(U.transpose(0, 2, 1))  # (16, C_in, C_out)
    y = xp.empty((N, C_out, H, W), dtype=x.dtype)
    for nb in _chunks(x, C_in, C_out, th * tw):
        n = nb.stop - nb.start
        V = _input_transform(x[nb], th, tw)  # (16, P, C_in)
        M = xp.matmul(V, UT).reshape(4, 4, th, tw, n, C_out)  # M[k] = V[k] U[k]^T (P, C_out), the transpose of U V
        if b is not None:
            M[1, 1] += b  # A^T e_1 e_1^T A is all ones: this adds b to the 4 outputs of each tile
        T = xp.empty((2, 4, th, tw, n, C_out), dtype=x.dtype)  # (r, b, ...)
        _at(M, T)  # T = A^T m: the rows of each tile
        Y = xp.empty((2, 2, th, tw, n, C_out), dtype=x.dtype)  # (r, q, ...): pixel (2t + r, 2s + q) of tile (t, s)
        _at(T.transpose(1, 0, 2, 3, 4, 5), Y.transpose(1, 0, 2, 3, 4, 5))  # Y = T A (columns)
        _from_phases(Y, y[nb], 0)  # (n, C_out, H, W)
    cache = (
        x,  # (N, C_in, H, W) the input, not V: V is 4x bigger, and backward rebuilds it with 8 adds
        w,  # (C_out, C_in, 3, 3) the weight: backward rebuilds U = G w G^T (small)
        b is not None,  # whether there was a bias, so db can be None when b was None
        1,  # the stride and padding, as in conv2d's cache, so that either backward takes either forward's cache
        (1, 1, 1, 1),
    )
    return y, cache


def winograd_conv3x3_backward(dy, cache):
    """dM = A dY A^T,   dU = sum_P dM V^T,   dw = G^T dU G,   dV = U^T dM,   dx = sum_tiles B dV B^T,   db = sum dy

    per tile and transform entry, the GEMMs batched over the 16 entries; overlapping input tiles
    (they share 2 rows or columns) add their gradients.

    Inputs:  dy (N, C_out, H, W) upstream gradient; cache from winograd_conv3x3_forward (or from
             conv2d_forward with a 3x3 kernel, stride 1, padding 1).
    Returns: dx (N, C_in, H, W), dw (C_out, C_in, 3, 3), db (C_out,) or None, like conv2d_backward.
    """
    x, w, has_bias, s, pads = cache
    check_conv2d_dy(dy, cache)
    if s != 1 or pads != (1, 1, 1, 1) or w.shape[2:] != (3, 3):
        raise ValueError(f"the cache must be of a 3x3 conv with stride 1 and padding 1, got kernel "
                         f"{tuple(w.shape[2:])}, stride {s}, padding {pads}")
    xp = get_array_module(dy, x)
    N, C_in, H, W = x.shape
    C_out = w.shape[0]
    th, tw = (H + 1) // 2, (W + 1) // 2
    dt = xp.result_type(dy.dtype, w.dtype)  # the dtype the matmuls give (dy's and x's, normally equal)
    gg = xp.asarray(GG, dtype=dt)  # (16, 9)
    U = (gg @ w.reshape(C_out * C_in, 9).T).reshape(16, C_out, C_in)  # G w G^T
    sign = xp.asarray(SIGN, dtype=dt)[:, None, None]  # (16, 1, 1)
    U_signed = U * sign  # exact: a sign flip

    # forward: b is added to M[1, 1]
    db = dy.sum(axis=(0, 2, 3)) if has_bias else None  # (C_out,)
    dU = xp.zeros((16, C_out, C_in), dtype=dt)  # summed over the chunks
    dx = xp.empty(x.shape, dtype=dt)  # (N, C_in, H, W), filled chunk by chunk
    for nb in _chunks(x, C_in, C_out, th * tw, backward=True):
        n = nb.stop - nb.start
        # forward: Y = A^T M A (T = A^T M, then Y = T A), y = the tiles of Y cropped to (H, W)
        dM = xp.empty((4, 4, th, tw, n, C_out), dtype=dt)  # slot k holds SIGN[k] dM[k]
        _output_transform_adjoint(dy[nb], dM)
        dM = dM.reshape(16, -1, C_out)  # (16, P, C_out)
        # forward: M = V U^T
        V = _input_transform(x[nb], th, tw)  # (16, P, C_in), rebuilt (see the cache note)
        dU += xp.matmul(dM.transpose(0, 2, 1), V)  # (16, C_out, C_in), SIGN[k] dU[k]
        dV = xp.matmul(dM, U_signed)  # (16, P, C_in): SIGN[k] dM[k] times SIGN[k] U[k]
        # forward: V = _input_transform(x)
        _input_transform_adjoint(dV, dx[nb], th, tw)
    dU *= sign  # exact: SIGN[k] SIGN[k] dU[k] = dU[k]
    # forward: U = G w G^T = GG @ w as (16, C_out * C_in)
    dw = (dU.reshape(16, C_out * C_in).T @ gg).reshape(w.shape)  # (C_out, C_in, 3, 3)
    return dx, dw, db
