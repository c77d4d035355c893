"""The fast conv (minidiff/fast/conv.py), every lowering against the reference conv2d (minidiff/nn/conv2d.py),
in float64. Winograd has its own tests (tests/fast/test_winograd.py).

fast/conv.py's conv2d_forward / _backward choose between lowerings by shape and backend:
  - batch chunks of at most CHUNK_BYTES of columns (NumPy): forced here to one sample per chunk;
  - dx gathered as a conv of dy with the flipped kernel (stride 1, pads <= k - 1, C_out <= 2 C_in)
    or scattered by col2im: each forced here on the configs where it applies;
  - im2col without a padded copy of x (fast/cpu/conv_lowering.py): taps gives the output range that reads inside x;
  - the lowering itself (choose_lowering): im2col, Winograd or, for 1x1 convs, one matmul per sample:
    im2col is forced here on every config, matmul where it applies;
  - on CuPy, im2col, col2im and the bias add as one kernel each (fast/cuda/im2col.py), run here by the fake CuPy.

Tolerance 1e-12 relative (rel_error: max|a - b| / max|b|) for the lowerings against the reference: they
sum the same products in another order (a batch chunk at a time; dw as (cols dy_col^T)^T; dx as a gather
instead of col2im's scatter; the 1x1 conv as batched matmuls), which in float64 moves a sum of at most
a few hundred terms by ~1e-16 of its size; any indexing or layout bug gives O(1). Where the arithmetic
is the same (im2col, a copy; col2im, the same taps added in the same order, in NumPy or in the CUDA
kernels) the tests ask for bit-for-bit equality.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fake_cupy
from gradcheck import rel_error
from minidiff.backend import is_cupy_array
from minidiff.fast import conv
from minidiff.fast.cpu import conv_lowering
from minidiff.fast.ops import FAST
from minidiff.nn import im2col as im2col_ref
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward
from minidiff.nn.ops import REFERENCE
from minidiff.nn.resample import downsample_backward, downsample_forward

TOL = 1e-12  # float64, same products summed in another order (see the docstring)


@st.composite
def conv_cfgs(draw):
    kh, kw = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    pads = tuple(draw(st.integers(0, 3)) for _ in range(4))
    H = draw(st.integers(max(1, kh - pads[0] - pads[1]), 6))
    W = draw(st.integers(max(1, kw - pads[2] - pads[3]), 6))
    return dict(N=draw(st.integers(1, 3)), C_in=draw(st.integers(1, 3)), C_out=draw(st.integers(1, 5)), H=H, W=W,
                kh=kh, kw=kw, stride=draw(st.integers(1, 3)), padding=pads, bias=draw(st.booleans()))


def cfg(N=3, C_in=2, C_out=3, H=5, W=4, kh=3, kw=3, stride=1, padding=(1, 1, 1, 1), bias=True):
    return dict(N=N, C_in=C_in, C_out=C_out, H=H, W=W, kh=kh, kw=kw, stride=stride, padding=padding, bias=bias)


EDGE = [
    cfg(),  # the U-Net's 3x3 conv: gather path, three chunks
    cfg(C_in=1, C_out=3),  # C_out > 2 C_in: scatter path (like conv_in)
    cfg(stride=2, padding=(0, 1, 0, 1)),  # diffusers' downsampling: scatter path
    cfg(padding=(3, 0, 2, 1), H=2, W=2),  # a pad > k - 1: scatter path; some taps read only padding
    cfg(kh=1, kw=1, padding=(0, 0, 0, 0)),  # the 1x1 shortcut conv
    cfg(N=1, H=1, W=1),  # 1x1 spatial: every tap but the centre reads padding
    cfg(padding=(0, 2, 1, 0), kh=3, kw=2),  # asymmetric pads and kernel on the gather path
]


def make(c, seed=None):
    rng = np.random.default_rng(c["N"] * 100 + c["C_out"] if seed is None else seed)
    x = rng.standard_normal((c["N"], c["C_in"], c["H"], c["W"]))
    w = rng.standard_normal((c["C_out"], c["C_in"], c["kh"], c["kw"]))
    b = rng.standard_normal(c["C_out"]) if c["bias"] else None
    return rng, x, w, b


def run_both(c, chunk_bytes, gather=None, lowering="auto"):
    """Fast (with CHUNK_BYTES, a lowering and optionally a forced dx lowering) and reference results on one problem."""
    rng, x, w, b = make(c)
    with mock.patch.object(conv_lowering, "CHUNK_BYTES", chunk_bytes):
        y, cache = conv.lowered_forward(x, w, b, c["stride"], c["padding"], lowering=lowering)
        dy = rng.standard_normal(y.shape)
        if gather is None:
            grads = conv.lowered_backward(dy, cache, lowering=lowering)
        else:
            with mock.patch.object(conv, "_dx_by_flipped_conv", lambda *a: gather):
                grads = conv.lowered_backward(dy, cache, lowering=lowering)
    y_ref, cache_ref = conv2d_forward(x, w, b, c["stride"], c["padding"])
    return (y, *grads), (y_ref, *conv2d_backward(dy, cache_ref))


def assert_close(fast, ref, tol=TOL):
    for f, r in zip(fast, ref):
        assert (f is None) == (r is None)
        if f is not None:
            assert f.shape == r.shape and f.dtype == r.dtype and rel_error(f, r) < tol


def gather_applies(c):
    pt, pb, pl, pr = c["padding"]
    return c["stride"] == 1 and max(pt, pb) <= c["kh"] - 1 and max(pl, pr) <= c["kw"] - 1


@given(c=conv_cfgs())
@example(c=EDGE[0])
@example(c=EDGE[1])
@example(c=EDGE[2])
@example(c=EDGE[3])
@example(c=EDGE[4])
@example(c=EDGE[5])
@example(c=EDGE[6])
def test_every_lowering_equals_the_reference(c):
    for chunk_bytes in (1, 2**21):  # one sample per chunk; the whole batch in one chunk
        assert_close(*run_both(c, chunk_bytes))  # the lowerings conv2d_forward / _backward pick
        assert_close(*run_both(c, chunk_bytes, gather=False, lowering="im2col"))  # col2im always applies
        if gather_applies(c):
            assert_close(*run_both(c, chunk_bytes, gather=True, lowering="im2col"))
    if (c["kh"], c["kw"], c["stride"], tuple(c["padding"])) == (1, 1, 1, (0, 0, 0, 0)):
        assert_close(*run_both(c, 2**21, lowering="matmul"))  # the 1x1 conv as one matmul per sample


@pytest.mark.parametrize("c", EDGE + [cfg(N=2, C_in=32, C_out=32, H=6, W=5)])  # the last: Winograd
def test_the_public_functions_and_the_fast_table(c):
    """fast.conv2d_forward / _backward (what FAST holds), with the reference's signature, equal the reference;
    each backward takes the other forward's cache."""
    assert (FAST.conv2d_forward, FAST.conv2d_backward) == (conv.conv2d_forward, conv.conv2d_backward)
    assert (FAST.downsample_forward, FAST.downsample_backward) == (conv.downsample_forward, conv.downsample_backward)
    assert REFERENCE.conv2d_forward is conv2d_forward and FAST.name == "fast"
    rng, x, w, b = make(c)
    y, cache = FAST.conv2d_forward(x, w, b, c["stride"], c["padding"])
    y_ref, cache_ref = conv2d_forward(x, w, b, stride=c["stride"], padding=c["padding"])
    dy = rng.standard_normal(y.shape)
    want = (y_ref, *conv2d_backward(dy, cache_ref))
    assert_close((y, *FAST.conv2d_backward(dy, cache)), want)
    assert_close((y, *FAST.conv2d_backward(dy, cache_ref)), want)
    assert_close((y_ref, *conv2d_backward(dy, cache)), want)


@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 3, 6, 6), (1, 2, 5, 7), (2, 1, 2, 2)])
def test_downsample_equals_the_reference(shape, padding):
    """fast.downsample_* (the stride-2 conv, col2im lowering) against nn/resample.py's, float64, TOL."""
    rng = np.random.default_rng(sum(shape) + padding)
    x, w, b = rng.standard_normal(shape), rng.standard_normal((4, shape[1], 3, 3)), rng.standard_normal(4)
    y, cache = conv.downsample_forward(x, w, b, padding=padding)
    y_ref, cache_ref = downsample_forward(x, w, b, padding=padding)
    dy = rng.standard_normal(y.shape)
    assert_close((y, *conv.downsample_backward(dy, cache)), (y_ref, *downsample_backward(dy, cache_ref)))
    with pytest.raises(ValueError, match="^padding must be an integer >= 0"):
        conv.downsample_forward(x, w, b, padding=-1)


def test_dx_lowering_choice():
    w33 = np.zeros((64, 64, 3, 3))
    assert conv._dx_by_flipped_conv(w33, 1, (1, 1, 1, 1))  # the U-Net's resnet convs gather
    assert not conv._dx_by_flipped_conv(w33, 2, (1, 1, 1, 1))  # stride 2: scatter
    assert not conv._dx_by_flipped_conv(w33, 1, (3, 0, 0, 0))  # pad > k - 1: scatter
    assert not conv._dx_by_flipped_conv(np.zeros((32, 3, 3, 3)), 1, (1, 1, 1, 1))  # conv_in: scatter


def test_lowering_choice_and_bad_input():
    x = np.zeros((8, 64, 8, 8), np.float32)  # 8 * 4 * 4 = 128 Winograd tiles
    w33, w11 = np.zeros((64, 64, 3, 3), np.float32), np.zeros((32, 64, 1, 1), np.float32)
    assert conv.choose_lowering(x, w33, 1, (1, 1, 1, 1)) == "winograd"  # a wide resnet conv
    assert conv.WINOGRAD_MIN_TILES == 128
    assert conv.choose_lowering(x[:7], w33, 1, (1, 1, 1, 1)) == "im2col"  # 112 tiles: 16 GEMMs of too few rows
    assert conv.choose_lowering(x[:2, :, :, :7], w33, 1, (1, 1, 1, 1)) == "im2col"  # 2 * 4 * 4 (odd W rounds up)
    assert conv.choose_lowering(np.zeros((1, 64, 31, 32)), w33, 1, (1, 1, 1, 1)) == "winograd"  # 16 * 16 tiles
    assert conv.choose_lowering(np.zeros((4, 512, 4, 4)), np.zeros((256, 512, 3, 3)), 1,
                                (1, 1, 1, 1)) == "im2col"  # a wide up-block conv at 4x4: not kn2row either
    assert conv.choose_lowering(x, w33, 2, (0, 1, 0, 1)) == "im2col"  # the stride-2 downsampler
    assert conv.choose_lowering(x[:, :3], np.zeros((64, 3, 3, 3)), 1, (1, 1, 1, 1)) == "im2col"  # conv_in
    assert conv.choose_lowering(x, w11, 1, (0, 0, 0, 0)) == "matmul"  # the shortcut
    for lowering, w, pads in (("winograd", w11, (0, 0, 0, 0)), ("matmul", w33, (1, 1, 1, 1))):
        with pytest.raises(ValueError, match=f"lowering='{lowering}' needs"):
            conv.choose_lowering(x, w, 1, pads, lowering)
    with pytest.raises(ValueError, match="lowering must be one of"):
        conv.lowered_forward(x, w33, None, 1, 1, lowering="fft")
    with pytest.raises(ValueError, match=r"^w must have the dtype of x"):  # the reference's validation
        conv.conv2d_forward(x, w33.astype(np.float64), None, 1, 1)


def test_chunks_cover_the_batch():
    x = np.zeros((10, 2, 4, 4), np.float32)
    with mock.patch.object(conv_lowering, "CHUNK_BYTES", 3 * 18 * 16 * 4):  # 3 samples of K=18, L=16 float32
        chunks = conv_lowering.chunks(x, 18, 16)
    assert [(s.start, s.stop) for s in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with mock.patch.object(conv_lowering, "CHUNK_BYTES", 1):
        assert len(conv_lowering.chunks(x, 18, 16)) == 10  # never less than one sample


@given(offset=st.integers(-5, 5), s=st.integers(1, 3), size=st.integers(1, 6), n_out=st.integers(1, 6))
def test_taps_is_the_range_that_reads_inside(offset, s, size, n_out):
    o0, o1, r0 = conv_lowering.taps(offset, s, size, n_out)
    inside = [o for o in range(n_out) if 0 <= s * o + offset < size]
    assert list(range(o0, o1)) == inside
    if inside:
        assert r0 == s * o0 + offset


def im2col_case(fn):
    """hypothesis-drawn im2col problems (the padded input covers the kernel) and the edge cases."""
    fn = given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7),
               kh=st.integers(1, 3), kw=st.integers(1, 3), s=st.integers(1, 3),
               pads=st.tuples(*[st.integers(0, 2)] * 4))(fn)
    fn = example(n=1, c=1, h=1, w=1, kh=1, kw=1, s=1, pads=(0, 0, 0, 0))(fn)  # 1x1 everything, no padding
    fn = example(n=2, c=3, h=6, w=5, kh=3, kw=3, s=2, pads=(1, 1, 1, 1))(fn)  # stride 2: the U-Net's downsample
    return example(n=2, c=2, h=5, w=4, kh=3, kw=2, s=2, pads=(0, 1, 0, 1))(fn)  # diffusers' padding, kh != kw


def im2col_problem(n, c, h, w, kh, kw, s, pads):
    """(x, dcols (C, kh, kw, N, Ho, Wo), Ho, Wo), or None where the padded input is smaller than the kernel."""
    pt, pb, pl, pr = pads
    if h + pt + pb < kh or w + pl + pr < kw:
        return None  # check_conv2d refuses these
    Ho, Wo = (h + pt + pb - kh) // s + 1, (w + pl + pr - kw) // s + 1
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, c, h, w)), rng.standard_normal((c, kh, kw, n, Ho, Wo)), Ho, Wo


@im2col_case
def test_the_per_tap_im2col_and_col2im_equal_the_reference(n, c, h, w, kh, kw, s, pads):
    """fast/cpu's im2col (no padded copy) and col2im (the same taps in the same order): nn/im2col.py's, exactly."""
    problem = im2col_problem(n, c, h, w, kh, kw, s, pads)
    if problem is None:
        return
    x, dcols, Ho, Wo = problem
    np.testing.assert_array_equal(conv_lowering.im2col_taps(x, kh, kw, s, pads, Ho, Wo),
                                  im2col_ref.im2col(x, kh, kw, s, pads))
    np.testing.assert_array_equal(conv_lowering.col2im_taps(dcols, x.shape, s, pads, Ho, Wo).transpose(1, 0, 2, 3),
                                  im2col_ref.col2im(dcols.reshape(c * kh * kw, -1), x.shape, kh, kw, s, pads))


@im2col_case
def test_the_cuda_im2col_and_col2im_kernels_equal_the_reference(n, c, h, w, kh, kw, s, pads):
    """fast/cuda/im2col.py's two kernels, their bodies' index arithmetic run by the fake CuPy (tests/fake_cupy.py),
    give nn/im2col.py's columns and col2im sums exactly (a copy; the same taps added in the same order)."""
    problem = im2col_problem(n, c, h, w, kh, kw, s, pads)
    if problem is None:
        return
    x, dcols, Ho, Wo = problem
    want = (im2col_ref.im2col(x, kh, kw, s, pads),
            im2col_ref.col2im(dcols.reshape(c * kh * kw, -1), x.shape, kh, kw, s, pads).transpose(1, 0, 2, 3))
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        got = (conv._im2col(fake.asarray(x), kh, kw, s, pads, Ho, Wo),
               conv._col2im(fake.asarray(dcols), x.shape, s, pads, Ho, Wo))
        assert fake.kernels_called == ["minidiff_im2col_double", "minidiff_col2im32"]
    for g, want_ in zip(got, want):
        assert g.shape == want_.shape
        np.testing.assert_array_equal(np.asarray(g), want_)


@pytest.mark.parametrize("c", [cfg(), cfg(C_in=1, C_out=3), cfg(stride=2, padding=(0, 1, 0, 1)),
                               cfg(kh=1, kw=1, padding=(0, 0, 0, 0)), cfg(N=2, C_in=32, C_out=32, H=6, W=5)])
def test_the_cuda_path_equals_the_reference_with_fewer_device_operations(monkeypatch, c):
    """On (fake) CuPy the fast conv runs its kernels (im2col, col2im or the flipped conv, bias_nchw; never
    Winograd, which is NumPy only) and equals the reference NumPy conv to TOL; the reference on the same fake
    device runs no kernel of minidiff's and makes more device operations (each a launch on a GPU)."""
    fake = fake_cupy.install(monkeypatch)
    rng, x, w, b = make(c)
    y_ref, cache_ref = conv2d_forward(x, w, b, c["stride"], c["padding"])
    dy = rng.standard_normal(y_ref.shape)
    want = (y_ref, *conv2d_backward(dy, cache_ref))
    xd, wd, bd, dyd = (fake.asarray(a) for a in (x, w, b, dy))
    counts = {}
    for name, ops in (("fast", FAST), ("reference", REFERENCE)):
        fake.kernels_called.clear()
        out = []

        def step(ops=ops, out=out):
            y, cache = ops.conv2d_forward(xd, wd, bd, c["stride"], c["padding"])
            out.extend((y, *ops.conv2d_backward(dyd, cache)))

        counts[name] = fake_cupy.count(step)["ops"]
        assert all(is_cupy_array(o) for o in out)
        assert_close(out, want)
        kernels = set(fake.kernels_called)
        if name == "reference":
            assert kernels == set()
        elif (c["kh"], c["kw"]) == (1, 1):
            assert kernels == set()  # the 1x1 conv: batched matmuls only
        else:
            assert {"minidiff_im2col_double", "minidiff_bias_nchw32"} <= kernels
            assert ("minidiff_col2im32" in kernels) != conv._dx_by_flipped_conv(w, c["stride"], tuple(c["padding"]))
    assert counts["fast"] < counts["reference"], counts
