"""Winograd F(2x2, 3x3) conv (minidiff/fast/cpu/winograd.py) against the reference im2col conv2d
(minidiff/nn/conv2d.py) it replaces in the fast conv (minidiff/fast/conv.py).

It computes the same 3x3, stride 1, padding 1 conv exactly (only the rounding differs), so in float64
forward and backward must equal conv2d_forward / conv2d_backward(padding=1) to ~1e-12 on every shape
(U = G w G^T holds halves of w and the transforms add and subtract up to 16 products per output where
im2col sums 9 C_in; the rounding of those sums in float64 is ~1e-16 of their size, far below 1e-12):
hypothesis draws H, W in 1..9 (odd sizes pad the tiles to an even size, 1x1 reads padding only)
and the @example rows pin the edge cases. Then: finite differences, PyTorch autograd, float32 error
against conv2d's own, batch chunking, purity, bad input, the exchange of caches, and CuPy.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_weight_bias_against_torch, check_weight_bias_grads, needs, rel_error
from minidiff.fast.cpu import winograd
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward
from minidiff.fast.cpu.winograd import winograd_conv3x3_backward, winograd_conv3x3_forward

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


def cfg(N=2, C_in=3, C_out=2, H=5, W=4, bias=True):
    return dict(N=N, C_in=C_in, C_out=C_out, H=H, W=W, bias=bias)


@st.composite
def cfgs(draw):
    return cfg(N=draw(st.integers(1, 3)), C_in=draw(st.integers(1, 5)), C_out=draw(st.integers(1, 5)),
               H=draw(st.integers(1, 9)), W=draw(st.integers(1, 9)), bias=draw(st.booleans()))


EDGE_CASES = [
    cfg(N=1, C_in=1, C_out=1, H=1, W=1),  # 1x1: one tile, every tap but the centre reads padding
    cfg(H=1, W=9, bias=False),  # one tile row, odd width, no bias
    cfg(H=8, W=1),  # one tile column
    cfg(N=3, C_in=5, C_out=4, H=2, W=2),  # exactly one 2x2 tile per sample
    cfg(N=1, H=7, W=9, C_in=1, C_out=5),  # odd both ways, C_out > C_in
    cfg(N=2, H=8, W=6, C_in=4, C_out=4),  # even: no crop
]


def winograd_case(fn):
    """Run fn on hypothesis-drawn configs and on every EDGE_CASES row."""
    fn = given(c=cfgs())(fn)
    for c in EDGE_CASES:
        fn = example(c=c)(fn)
    return fn


def make(c, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((c["N"], c["C_in"], c["H"], c["W"])).astype(dtype)
    w = rng.standard_normal((c["C_out"], c["C_in"], 3, 3)).astype(dtype)
    b = rng.standard_normal(c["C_out"]).astype(dtype) if c["bias"] else None
    return x, w, b


@winograd_case
def test_equals_conv2d(c):
    x, w, b = make(c, seed=1)
    y_ref, cache_ref = conv2d_forward(x, w, b, stride=1, padding=1)
    dy = np.random.default_rng(2).standard_normal(y_ref.shape)
    grads_ref = conv2d_backward(dy, cache_ref)
    for chunk_bytes in (1, winograd.CHUNK_BYTES):  # one sample per chunk; the default
        with mock.patch.object(winograd, "CHUNK_BYTES", chunk_bytes):
            y, cache = winograd_conv3x3_forward(x, w, b)
            grads = winograd_conv3x3_backward(dy, cache)
        assert y.shape == y_ref.shape and y.dtype == np.float64
        assert rel_error(y, y_ref) < 1e-12
        for g, g_ref in zip(grads, grads_ref):
            assert (g is None) == (g_ref is None)
            if g is not None:
                assert g.shape == g_ref.shape and rel_error(g, g_ref) < 1e-12


@winograd_case
def test_finite_differences(c):
    x, w, b = make(c)
    check_weight_bias_grads(winograd_conv3x3_forward, winograd_conv3x3_backward, x, w, b, MAX_COORDS)


@needs("torch")
@winograd_case
def test_matches_torch(c):
    torch = pytest.importorskip("torch")
    x, w, b = make(c, seed=3)
    check_weight_bias_against_torch(torch, winograd_conv3x3_forward, winograd_conv3x3_backward,
                                    lambda xt, wt, bt: torch.nn.functional.conv2d(xt, wt, bt, padding=1), x, w, b,
                                    seed=4)


def float32_errors(fwd, bwd, x, w, b, dy):
    """Relative errors of fwd/bwd in float32 against the float64 conv2d on the same (float32-exact) inputs."""
    y_ref, cache_ref = conv2d_forward(x, w, b, stride=1, padding=1)
    refs = (y_ref, *conv2d_backward(dy, cache_ref))
    f32 = [a.astype(np.float32) for a in (x, w, b, dy)]
    y, cache = fwd(*f32[:3])
    outs = (y, *bwd(f32[3], cache))
    assert all(o.dtype == np.float32 for o in outs)
    return [rel_error(o, r) for o, r in zip(outs, refs)]


@pytest.mark.parametrize("shape", [(8, 32, 16, 16, 32), (4, 128, 8, 8, 64), (16, 64, 4, 4, 64)])
def test_float32_error_like_conv2d(shape):
    """Winograd's transforms add and subtract up to 16 products per output (U holds halves of w):
    its float32 error must stay within a small factor of im2col's, and ~1e-6 relative."""
    N, C_in, H, W, C_out = shape
    rng = np.random.default_rng(5)
    x, dy = rng.standard_normal((N, C_in, H, W)), rng.standard_normal((N, C_out, H, W))
    w, b = rng.standard_normal((C_out, C_in, 3, 3)) / np.sqrt(9 * C_in), rng.standard_normal(C_out)
    x, w, b, dy = (a.astype(np.float32).astype(np.float64) for a in (x, w, b, dy))  # exact in both dtypes

    def conv2d_p1(x, w, b):
        return conv2d_forward(x, w, b, stride=1, padding=1)

    err_im2col = float32_errors(conv2d_p1, conv2d_backward, x, w, b, dy)
    err_winograd = float32_errors(winograd_conv3x3_forward, winograd_conv3x3_backward, x, w, b, dy)
    for name, e_w, e_i in zip(("y", "dx", "dw", "db"), err_winograd, err_im2col):
        assert e_w < 2e-6 and e_w < 4 * e_i + 1e-7, (name, e_w, e_i)


@given(n=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9), offset=st.sampled_from([0, 1]))
@example(n=1, C=1, H=1, W=1, offset=1)
@example(n=1, C=1, H=2, W=2, offset=0)
def test_phases_are_the_padded_pixels_and_their_adjoint(n, C, H, W, offset):
    """_to_phases puts pixel (2i + r - offset, 2j + q - offset) at [r, q, i, j] and zeros elsewhere;
    _from_phases reads those entries back: a copy, so exact, and its adjoint in float64."""
    rng = np.random.default_rng(H * 10 + W)
    x = rng.standard_normal((n, C, H, W))
    I, J = (H + 1) // 2 + offset, (W + 1) // 2 + offset
    ph = np.full((2, 2, I, J, n, C), np.nan)
    winograd._to_phases(x, ph, offset)
    want = np.zeros_like(ph)
    for r, q, i, j in np.ndindex(2, 2, I, J):
        h, v = 2 * i + r - offset, 2 * j + q - offset
        if 0 <= h < H and 0 <= v < W:
            want[r, q, i, j] = x[:, :, h, v]
    assert np.array_equal(ph, want)
    back = np.full_like(x, np.nan)
    winograd._from_phases(ph, back, offset)
    assert np.array_equal(back, x)
    p = rng.standard_normal(ph.shape)
    winograd._from_phases(p, back, offset)
    assert abs(np.vdot(ph, p) - np.vdot(x, back)) <= 1e-12 * max(1.0, abs(np.vdot(x, back)))


def at_adjoint_twice(dy, th, tw):
    """dM = A dY A^T per tile as the backward computed it before the sign trick: the phases of dy copied
    into a zero-padded channels-last array, then (d0, d0 + d1, d0 - d1, -d1) along b, then along a."""
    n, C, H, W = dy.shape
    dy_pad = np.zeros((2 * th, 2 * tw, n, C))
    dy_pad[:H, :W] = dy.transpose(2, 3, 0, 1)
    dY = dy_pad.reshape(th, 2, tw, 2, n, C).transpose(1, 3, 0, 2, 4, 5)  # (r, q, t, s, n, C)

    def adjoint(d, axis):  # A^T's adjoint along `axis` (length 2 -> 4)
        d0, d1 = np.take(d, 0, axis), np.take(d, 1, axis)
        return np.stack([d0, d0 + d1, d0 - d1, -d1], axis)

    return adjoint(adjoint(dY, 1), 0)  # (a, b, t, s, n, C)


@given(n=st.integers(1, 3), C=st.integers(1, 3), H=st.integers(1, 9), W=st.integers(1, 9))
@example(n=1, C=1, H=1, W=1)
@example(n=1, C=1, H=2, W=2)
def test_output_transform_adjoint_is_A_dY_AT_with_signs(n, C, H, W):
    """_output_transform_adjoint writes SIGN[k] dM[k], dM = A dY A^T per tile: bit for bit the numbers of the
    two-pass adjoint (the same adds, only exact sign flips differ), and within 1e-15 of the plain sum."""
    dy = np.random.default_rng(H * 10 + W).standard_normal((n, C, H, W))
    th, tw = (H + 1) // 2, (W + 1) // 2
    dM = np.full((4, 4, th, tw, n, C), np.nan)
    winograd._output_transform_adjoint(dy, dM)
    want = at_adjoint_twice(dy, th, tw)
    assert np.array_equal(dM, winograd.SIGN.reshape(4, 4, 1, 1, 1, 1) * want)
    AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]])  # (r, a)
    dy_pad = np.zeros((n, C, 2 * th, 2 * tw))
    dy_pad[:, :, :H, :W] = dy
    dY = dy_pad.reshape(n, C, th, 2, tw, 2)  # (n, C, t, r, s, q)
    plain = np.einsum("ra,qb,nctrsq->abtsnc", AT, AT, dY)
    assert np.abs(want - plain).max() <= 1e-15 * np.abs(plain).max()


def test_caches_are_exchangeable():
    """conv2d_backward takes winograd's cache and the other way round (the lead may mix lowerings)."""
    x, w, b = make(cfg(N=2, C_in=3, C_out=4, H=6, W=5))
    y, cache_w = winograd_conv3x3_forward(x, w, b)
    _, cache_c = conv2d_forward(x, w, b, stride=1, padding=1)
    dy = np.random.default_rng(6).standard_normal(y.shape)
    for g1, g2 in zip(conv2d_backward(dy, cache_w), winograd_conv3x3_backward(dy, cache_c)):
        assert rel_error(g1, g2) < 1e-12


def test_float32_and_purity():
    x, w, b = make(cfg(N=3, H=5, W=7), dtype=np.float32)
    y, cache = winograd_conv3x3_forward(x, w, b)
    assert y.dtype == np.float32 and y.shape == (3, 2, 5, 7) and y.flags.c_contiguous
    dy = np.random.default_rng(7).standard_normal(y.shape).astype(np.float32)
    dy0, x0, w0 = dy.copy(), x.copy(), w.copy()
    grads = winograd_conv3x3_backward(dy, cache)
    assert [g.dtype for g in grads] == [np.float32] * 3 and grads[0].shape == x.shape
    assert np.array_equal(dy, dy0) and np.array_equal(x, x0) and np.array_equal(w, w0)
    for g in grads:
        for a in (dy, x, w, b):
            assert not np.shares_memory(g, a)


def test_chunks_cover_the_batch():
    x = np.zeros((10, 2, 4, 4), np.float32)
    with mock.patch.object(winograd, "CHUNK_BYTES", 3 * 16 * 5 * 4 * 4):  # 3 samples: C_in + C_out = 5, 4 tiles
        chunks = winograd._chunks(x, 2, 3, 4)
    assert [(s.start, s.stop) for s in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with mock.patch.object(winograd, "CHUNK_BYTES", 2 * 3 * 16 * 5 * 4 * 4):  # the backward takes half: 3 samples
        assert [(s.start, s.stop) for s in winograd._chunks(x, 2, 3, 4, backward=True)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with mock.patch.object(winograd, "CHUNK_BYTES", 1):
        assert len(winograd._chunks(x, 2, 3, 4)) == 10  # never less than one sample
        assert len(winograd._chunks(x, 2, 3, 4, backward=True)) == 10


def test_bad_input():
    x, w, b = make(cfg(N=1, C_in=2, C_out=3, H=4, W=4))
    with pytest.raises(ValueError, match=r"^w must have shape \(C_out, C_in, 3, 3\)"):
        winograd_conv3x3_forward(x, w[:, :, :2], b)
    with pytest.raises(ValueError, match=r"^w.shape\[1\] \(C_in\) must equal"):
        winograd_conv3x3_forward(x, w[:, :1], b)
    with pytest.raises(ValueError, match=r"^x must be a floating-point"):
        winograd_conv3x3_forward(x.astype(np.int32), w, b)
    with pytest.raises(ValueError, match=r"^b must have shape"):
        winograd_conv3x3_forward(x, w, b[:2])
    with pytest.raises(ValueError, match=r"^w must have the dtype of x"):
        winograd_conv3x3_forward(x, w.astype(np.float32), b)
    y, cache = winograd_conv3x3_forward(x, w, b)
    with pytest.raises(ValueError, match=r"^dy must have shape"):
        winograd_conv3x3_backward(y[:, :, :3], cache)
    _, cache_s2 = conv2d_forward(x, w, b, stride=2, padding=1)
    with pytest.raises(ValueError, match=r"^the cache must be of a 3x3 conv with stride 1 and padding 1"):
        winograd_conv3x3_backward(np.zeros((1, 3, 2, 2)), cache_s2)


@pytest.mark.gpu
def test_cupy_equals_numpy():
    cupy = pytest.importorskip("cupy")
    from minidiff.backend import gpu_available, to_device, to_numpy

    if not gpu_available():
        pytest.skip("needs CuPy with a CUDA device")
    x, w, b = make(cfg(N=3, C_in=4, C_out=5, H=7, W=6))
    y, cache = winograd_conv3x3_forward(x, w, b)
    dy = np.random.default_rng(8).standard_normal(y.shape)
    want = (y, *winograd_conv3x3_backward(dy, cache))
    xd, wd, bd, dyd = (to_device(a, "gpu") for a in (x, w, b, dy))
    yd, cache_d = winograd_conv3x3_forward(xd, wd, bd)
    got = (yd, *winograd_conv3x3_backward(dyd, cache_d))
    for g, h in zip(got, want):
        assert isinstance(g, cupy.ndarray) and g.shape == h.shape
        assert rel_error(to_numpy(g), h) < 1e-10
