"""The fast conv's lowerings, each against the loop version (conv2d_naive_*), in float64.

conv2d_forward/backward choose between lowerings by shape (see minidiff/nn/conv2d.py):
  - batch chunks of at most CHUNK_BYTES of columns (NumPy): forced here to one sample per chunk;
  - dx gathered as a conv of dy with the flipped kernel (stride 1, pads <= k - 1, C_out <= 2 C_in)
    or scattered by col2im: each forced here on the configs where it applies;
  - im2col without a padded copy of x: _taps gives the output range that reads inside x;
  - the lowering itself (choose_lowering): im2col, Winograd (tests/test_winograd.py) or, for 1x1
    convs, one matmul per sample: im2col is forced here on every config, matmul where it applies.
The tiny shapes of test_nn_linear_conv.py never split the batch, so these tests do.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import rel_error
from minidiff.nn import conv2d, im2col
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward
from minidiff.nn.conv2d_naive import conv2d_naive_backward, conv2d_naive_forward


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


def run_both(c, chunk_bytes, gather=None, lowering="auto"):
    """Fast (with CHUNK_BYTES, a lowering and optionally a forced dx lowering) and naive results on one problem."""
    rng = np.random.default_rng(c["N"] * 100 + c["C_out"])
    x = rng.standard_normal((c["N"], c["C_in"], c["H"], c["W"]))
    w = rng.standard_normal((c["C_out"], c["C_in"], c["kh"], c["kw"]))
    b = rng.standard_normal(c["C_out"]) if c["bias"] else None
    with mock.patch.object(conv2d, "CHUNK_BYTES", chunk_bytes):
        y, cache = conv2d_forward(x, w, b, c["stride"], c["padding"], lowering=lowering)
        dy = rng.standard_normal(y.shape)
        if gather is None:
            grads = conv2d_backward(dy, cache, lowering=lowering)
        else:
            with mock.patch.object(conv2d, "_dx_by_flipped_conv", lambda *a: gather):
                grads = conv2d_backward(dy, cache, lowering=lowering)
    yn, cache_n = conv2d_naive_forward(x, w, b, c["stride"], c["padding"])
    return (y, *grads), (yn, *conv2d_naive_backward(dy, cache_n))


def assert_close(fast, naive):
    for f, n in zip(fast, naive):
        assert (f is None) == (n is None)
        if f is not None:
            assert f.shape == n.shape and rel_error(f, n) < 1e-12


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
def test_every_lowering_equals_naive(c):
    for chunk_bytes in (1, 2**21):  # one sample per chunk; the whole batch in one chunk
        assert_close(*run_both(c, chunk_bytes))  # the lowerings conv2d_forward / _backward pick
        assert_close(*run_both(c, chunk_bytes, gather=False, lowering="im2col"))  # col2im always applies
        if gather_applies(c):
            assert_close(*run_both(c, chunk_bytes, gather=True, lowering="im2col"))
    if (c["kh"], c["kw"], c["stride"], tuple(c["padding"])) == (1, 1, 1, (0, 0, 0, 0)):
        assert_close(*run_both(c, 2**21, lowering="matmul"))  # the 1x1 conv as one matmul per sample


def test_dx_lowering_choice():
    w33 = np.zeros((64, 64, 3, 3))
    assert conv2d._dx_by_flipped_conv(w33, 1, (1, 1, 1, 1))  # the U-Net's resnet convs gather
    assert not conv2d._dx_by_flipped_conv(w33, 2, (1, 1, 1, 1))  # stride 2: scatter
    assert not conv2d._dx_by_flipped_conv(w33, 1, (3, 0, 0, 0))  # pad > k - 1: scatter
    assert not conv2d._dx_by_flipped_conv(np.zeros((32, 3, 3, 3)), 1, (1, 1, 1, 1))  # conv_in: scatter


def test_lowering_choice_and_bad_input():
    x = np.zeros((2, 64, 8, 8), np.float32)
    w33, w11 = np.zeros((64, 64, 3, 3), np.float32), np.zeros((32, 64, 1, 1), np.float32)
    assert conv2d.choose_lowering(x, w33, 1, (1, 1, 1, 1)) == "winograd"  # a wide resnet conv
    assert conv2d.choose_lowering(x, w33, 2, (0, 1, 0, 1)) == "im2col"  # the stride-2 downsampler
    assert conv2d.choose_lowering(x[:, :3], np.zeros((64, 3, 3, 3)), 1, (1, 1, 1, 1)) == "im2col"  # conv_in
    assert conv2d.choose_lowering(x, w11, 1, (0, 0, 0, 0)) == "matmul"  # the shortcut
    for lowering, w, pads in (("winograd", w11, (0, 0, 0, 0)), ("matmul", w33, (1, 1, 1, 1))):
        with pytest.raises(ValueError, match=f"lowering='{lowering}' needs"):
            conv2d.choose_lowering(x, w, 1, pads, lowering)
    with pytest.raises(ValueError, match="lowering must be one of"):
        conv2d_forward(x, w33, None, 1, 1, lowering="fft")


def test_chunks_cover_the_batch():
    x = np.zeros((10, 2, 4, 4), np.float32)
    with mock.patch.object(conv2d, "CHUNK_BYTES", 3 * 18 * 16 * 4):  # 3 samples of K=18, L=16 float32
        chunks = conv2d._chunks(x, 18, 16)
    assert [(s.start, s.stop) for s in chunks] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    with mock.patch.object(conv2d, "CHUNK_BYTES", 1):
        assert len(conv2d._chunks(x, 18, 16)) == 10  # never less than one sample


@given(offset=st.integers(-5, 5), s=st.integers(1, 3), size=st.integers(1, 6), n_out=st.integers(1, 6))
def test_taps_is_the_range_that_reads_inside(offset, s, size, n_out):
    o0, o1, r0 = im2col._taps(offset, s, size, n_out)
    inside = [o for o in range(n_out) if 0 <= s * o + offset < size]
    assert list(range(o0, o1)) == inside
    if inside:
        assert r0 == s * o0 + offset


@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(1, 3),
       s=st.integers(1, 3), pads=st.tuples(*[st.integers(0, 2)] * 4))
@example(n=1, c=1, h=1, w=1, k=1, s=1, pads=(0, 0, 0, 0))  # 1x1 everything, no padding
@example(n=2, c=3, h=6, w=5, k=3, s=2, pads=(1, 1, 1, 1))  # stride 2: the U-Net's downsample
def test_strided_im2col_equals_the_per_tap_copy(n, c, h, w, k, s, pads):
    """CuPy's im2col (a padded copy and one strided gather) gives the per-tap copies' columns, exactly."""
    pt, pb, pl, pr = pads
    if h + pt + pb < k or w + pl + pr < k:
        return  # _setup refuses these (padded input smaller than the kernel)
    Ho, Wo = (h + pt + pb - k) // s + 1, (w + pl + pr - k) // s + 1
    x = np.random.default_rng(0).standard_normal((n, c, h, w))
    np.testing.assert_array_equal(im2col._im2col_strided(x, k, k, s, pads, Ho, Wo),
                                  im2col._im2col(x, k, k, s, pads, Ho, Wo))


@given(n=st.integers(1, 3), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), kh=st.integers(1, 3),
       kw=st.integers(1, 3), s=st.integers(1, 3), pads=st.tuples(*[st.integers(0, 2)] * 4))
@example(n=1, c=1, h=1, w=1, kh=1, kw=1, s=1, pads=(0, 0, 0, 0))  # 1x1 everything, no padding
@example(n=2, c=3, h=6, w=5, kh=3, kw=3, s=2, pads=(1, 1, 1, 1))  # stride 2: the U-Net's downsample
@example(n=2, c=2, h=5, w=4, kh=3, kw=2, s=2, pads=(0, 1, 0, 1))  # diffusers' asymmetric padding, kh != kw
def test_the_cuda_im2col_and_col2im_kernels_equal_the_array_ops(n, c, h, w, kh, kw, s, pads):
    """im2col_cuda.py's two kernels, their bodies' index arithmetic run by the fake CuPy (tests/fake_cupy.py),
    give the NumPy columns and col2im sums exactly (a copy; the same taps added in the same order)."""
    import fake_cupy
    from minidiff import backend

    pt, pb, pl, pr = pads
    if h + pt + pb < kh or w + pl + pr < kw:
        return  # _setup refuses these (padded input smaller than the kernel)
    Ho, Wo = (h + pt + pb - kh) // s + 1, (w + pl + pr - kw) // s + 1
    rng = np.random.default_rng(0)
    x, dcols = rng.standard_normal((n, c, h, w)), rng.standard_normal((c, kh, kw, n, Ho, Wo))
    want = im2col._im2col(x, kh, kw, s, pads, Ho, Wo), im2col._col2im(dcols, x.shape, s, pads, Ho, Wo)
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        mp.setattr(backend, "FUSED", True)
        got = (im2col._im2col(fake.asarray(x), kh, kw, s, pads, Ho, Wo),
               im2col._col2im(fake.asarray(dcols), x.shape, s, pads, Ho, Wo))
        assert fake.kernels_called == ["minidiff_im2col_double", "minidiff_col2im32"]
    for g, want_ in zip(got, want):
        assert g.shape == want_.shape
        np.testing.assert_array_equal(np.asarray(g), want_)
