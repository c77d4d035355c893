"""The kn2row conv (minidiff/fast/cpu/conv_kn2row.py) against the reference conv2d (minidiff/nn/conv2d.py).

It sums the same products as the reference in another order (the taps' planes added one by one
instead of one dot product of length kh*kw*C_in), so in float64 forward and backward (through a
random upstream gradient) must equal conv2d_forward / conv2d_backward to 1e-12 relative on every
shape it applies to: stride 1, every pad <= k - 1. Hypothesis draws batch 1-3, channels 1-4
(C_out >= C_in too, by asking for the lowering), kernels 1-3 by 1-3, spatial 1-7 (odd, 1x1,
2x2), asymmetric pads; batch chunks of one sample and of the whole batch.
"""

from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import rel_error
from minidiff.fast import conv
from minidiff.fast.cpu import conv_kn2row, conv_lowering
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward

TOL = 1e-12


@st.composite
def cases(draw):
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pads = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)),
            draw(st.integers(0, kw - 1)))
    H = draw(st.integers(max(1, kh - pads[0] - pads[1]), 7))
    W = draw(st.integers(max(1, kw - pads[2] - pads[3]), 7))
    return dict(N=draw(st.integers(1, 3)), C_in=draw(st.integers(1, 4)), C_out=draw(st.integers(1, 4)), H=H, W=W,
                kh=kh, kw=kw, pads=pads, bias=draw(st.booleans()))


def case(N=2, C_in=4, C_out=2, H=5, W=4, kh=3, kw=3, pads=(1, 1, 1, 1), bias=True):
    return dict(N=N, C_in=C_in, C_out=C_out, H=H, W=W, kh=kh, kw=kw, pads=pads, bias=bias)


def fast_and_reference(c, dtype=np.float64, chunk_bytes=2**21):
    rng = np.random.default_rng(c["N"] * 1000 + c["H"] * 10 + c["W"])
    x = rng.standard_normal((c["N"], c["C_in"], c["H"], c["W"])).astype(dtype)
    w = rng.standard_normal((c["C_out"], c["C_in"], c["kh"], c["kw"])).astype(dtype)
    b = rng.standard_normal(c["C_out"]).astype(dtype) if c["bias"] else None
    with mock.patch.object(conv_lowering, "CHUNK_BYTES", chunk_bytes):
        y, cache = conv.lowered_forward(x, w, b, 1, c["pads"], lowering="kn2row")
        dy = rng.standard_normal(y.shape).astype(dtype)
        dy0 = dy.copy()
        grads = conv.lowered_backward(dy, cache, lowering="kn2row")
    assert np.array_equal(dy, dy0)  # the upstream gradient is not touched
    y_ref, cache_ref = conv2d_forward(x, w, b, 1, c["pads"])
    return (y, *grads), (y_ref, *conv2d_backward(dy, cache_ref))


@given(c=cases())
@example(c=case())  # conv_out's kind: fewer channels out than in
@example(c=case(N=1, C_in=1, C_out=1, H=1, W=1))  # batch 1, one channel, 1x1: every tap but the centre reads padding
@example(c=case(N=1, C_in=1, C_out=3, H=2, W=2, bias=False))  # 2x2, C_out > C_in (auto would not pick it)
@example(c=case(N=3, C_in=3, C_out=1, H=7, W=5, kh=2, kw=3, pads=(0, 1, 2, 0)))  # odd sizes, asymmetric pads
def test_equals_conv2d_in_float64(c):
    for chunk_bytes in (1, 2**21):  # one sample per chunk; the whole batch in one chunk
        fast, ref = fast_and_reference(c, chunk_bytes=chunk_bytes)
        for f, r in zip(fast, ref):
            assert (f is None) == (r is None)
            if f is not None:
                assert f.shape == r.shape and f.dtype == r.dtype and rel_error(f, r) < TOL


def test_float32_error_like_conv2d():
    """conv_out's shape (32 -> 3 channels): the float32 error against a float64 reference stays within 2x of
    the reference's own float32 error (the same products, summed in another order)."""
    c = case(N=4, C_in=32, C_out=3, H=16, W=16)
    exact, _ = fast_and_reference(c)  # float64 kn2row ~ the exact values
    fast32, ref32 = fast_and_reference(c, np.float32)
    for f, r, e in zip(fast32, ref32, exact):
        assert f.dtype == np.float32
        assert rel_error(f.astype(np.float64), e) < 2 * rel_error(r.astype(np.float64), e) + 1e-7


def test_lowering_choice():
    x = np.zeros((8, 32, 8, 8))  # 128 Winograd tiles (conv.WINOGRAD_MIN_TILES)
    conv_out = np.zeros((3, 32, 3, 3))
    assert conv.choose_lowering(x, conv_out, 1, (1, 1, 1, 1)) == "kn2row"
    assert conv.choose_lowering(x, np.zeros((32, 32, 3, 3)), 1, (1, 1, 1, 1)) == "winograd"
    assert conv.choose_lowering(x, np.zeros((16, 32, 3, 3)), 2, (0, 1, 0, 1)) == "im2col"  # stride 2
    assert conv.choose_lowering(x, np.zeros((16, 32, 3, 3)), 1, (3, 0, 0, 0)) == "im2col"  # a pad > k - 1
    assert conv.choose_lowering(x, np.zeros((64, 32, 3, 3)), 1, (1, 1, 1, 1)) == "winograd"
    assert conv.choose_lowering(x[:, :3], np.zeros((32, 3, 3, 3)), 1, (1, 1, 1, 1)) == "im2col"  # conv_in
    assert not conv_kn2row.pays(x, np.zeros((3, 32, 1, 1)), 1, (0, 0, 0, 0))  # a 1x1 conv is a matmul
    with pytest.raises(ValueError, match="lowering='kn2row' needs"):
        conv.choose_lowering(x, conv_out, 2, (1, 1, 1, 1), "kn2row")
