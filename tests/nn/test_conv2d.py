"""The reference conv2d (minidiff/nn/conv2d.py) and its im2col / col2im (minidiff/nn/im2col.py), in float64:
finite differences through a random upstream gradient, the loop oracle (tests/oracles/conv2d_naive.py),
PyTorch autograd, im2col's adjoint, dtype, no mutation, bad input, and the same code on (fake) CuPy.

Shapes are tiny on purpose (CI runs on 2 cores); hypothesis picks them, including the edge cases
(padding 0, stride 2, 1x1 spatial, odd sizes, batch 1, kernel 1 and 3, asymmetric padding, bias None)
and the @example rows pin those edge cases for every run.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_weight_bias_against_torch, check_weight_bias_grads, needs, rel_error
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward
from minidiff.nn.im2col import col2im, im2col
from oracles.conv2d_naive import conv2d_naive_backward, conv2d_naive_forward
from purity import assert_backward_pure

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


@st.composite
def conv_cfgs(draw):
    """Tiny conv problems; H, W are drawn so that the padded input covers the kernel."""
    kh, kw = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 2, 3]))
    if draw(st.booleans()):
        padding = draw(st.integers(0, 2))
        pt = pb = pl = pr = padding
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
        pt, pb, pl, pr = padding
    H = draw(st.integers(max(1, kh - pt - pb), 7))
    W = draw(st.integers(max(1, kw - pl - pr), 7))
    return dict(N=draw(st.integers(1, 2)), C_in=draw(st.integers(1, 3)), C_out=draw(st.integers(1, 3)),
                H=H, W=W, kh=kh, kw=kw, stride=draw(st.integers(1, 3)), padding=padding, bias=draw(st.booleans()))


def make_conv(cfg, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((cfg["N"], cfg["C_in"], cfg["H"], cfg["W"])).astype(dtype)
    w = rng.standard_normal((cfg["C_out"], cfg["C_in"], cfg["kh"], cfg["kw"])).astype(dtype)
    b = rng.standard_normal(cfg["C_out"]).astype(dtype) if cfg["bias"] else None
    return x, w, b


def conv_cfg(N=1, C_in=2, C_out=2, H=5, W=5, kh=3, kw=3, stride=1, padding=0, bias=True):
    return dict(N=N, C_in=C_in, C_out=C_out, H=H, W=W, kh=kh, kw=kw, stride=stride, padding=padding, bias=bias)


EDGE_CASES = [
    conv_cfg(padding=0),  # padding 0: the x[p:-p] pitfall in backward
    conv_cfg(N=2, H=6, W=6, stride=2, padding=1),  # the UNet's stride-2 downsampling conv
    conv_cfg(H=1, W=1, kh=1, kw=1, padding=0),  # 1x1 spatial, 1x1 kernel
    conv_cfg(H=1, W=1, padding=1),  # 1x1 spatial, 3x3 kernel, all taps but the centre hit padding
    conv_cfg(H=5, W=7, kh=1, kw=1, stride=2, padding=0, bias=False),  # kernel 1, stride 2, odd sizes, no bias
    conv_cfg(N=2, C_in=3, C_out=1, H=7, W=5, stride=2, padding=(0, 1, 0, 1)),  # diffusers' asymmetric padding
    conv_cfg(H=4, W=3, kh=2, kw=3, stride=3, padding=(2, 0, 1, 2), bias=False),  # even kernel, stride > kernel rows
    conv_cfg(C_in=1, C_out=1, H=2, W=2, kh=1, kw=1, padding=2),  # found: dw cancels to 1e-3 (gradcheck's noise floor)
]


def conv_case(fn):
    """Run fn on hypothesis-drawn conv configs and on every EDGE_CASES row."""
    fn = given(cfg=conv_cfgs())(fn)
    for cfg in EDGE_CASES:
        fn = example(cfg=cfg)(fn)
    return fn


@conv_case
def test_conv2d_finite_differences(cfg):
    x, w, b = make_conv(cfg)

    def forward(x, w, b=None):
        return conv2d_forward(x, w, b, stride=cfg["stride"], padding=cfg["padding"])

    check_weight_bias_grads(forward, conv2d_backward, x, w, b, MAX_COORDS)


@conv_case
def test_conv2d_equals_the_loop_oracle(cfg):
    """im2col + one matmul sums the same products as the loops, in another order: 1e-12 relative."""
    x, w, b = make_conv(cfg, seed=4)
    y, cache = conv2d_forward(x, w, b, cfg["stride"], cfg["padding"])
    yn, cache_n = conv2d_naive_forward(x, w, b, cfg["stride"], cfg["padding"])
    assert y.shape == yn.shape
    assert rel_error(y, yn) < 1e-12
    dy = np.random.default_rng(5).standard_normal(y.shape)
    for g, gn in zip(conv2d_backward(dy, cache), conv2d_naive_backward(dy, cache_n)):
        assert (g is None) == (gn is None)
        if g is not None:
            assert rel_error(g, gn) < 1e-12


@needs("torch")
@conv_case
def test_conv2d_matches_torch(cfg):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = make_conv(cfg, seed=6)

    def torch_conv(xt, wt, bt):
        if isinstance(cfg["padding"], tuple):
            pt, pb, pl, pr = cfg["padding"]
            return F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, bt, stride=cfg["stride"])  # F.pad: last dim first
        return F.conv2d(xt, wt, bt, stride=cfg["stride"], padding=cfg["padding"])

    def forward(x, w, b):
        return conv2d_forward(x, w, b, cfg["stride"], cfg["padding"])

    check_weight_bias_against_torch(torch, forward, conv2d_backward, torch_conv, x, w, b, seed=7)


@conv_case
def test_col2im_is_the_adjoint_of_im2col(cfg):
    """<im2col(x), C> = <x, col2im(C)> for every x and C: col2im is im2col's transpose (float64, 1e-12)."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((cfg["N"], cfg["C_in"], cfg["H"], cfg["W"]))
    p = cfg["padding"]
    pads = tuple(p) if isinstance(p, tuple) else (p,) * 4
    cols = im2col(x, cfg["kh"], cfg["kw"], cfg["stride"], pads)
    c = rng.standard_normal(cols.shape)
    dx = col2im(c, x.shape, cfg["kh"], cfg["kw"], cfg["stride"], pads)
    assert dx.shape == x.shape
    lhs, rhs = float(np.sum(cols * c)), float(np.sum(x * dx))
    assert abs(lhs - rhs) < 1e-12 * (np.abs(cols * c).sum() + 1e-300)


@pytest.mark.parametrize("fwd,bwd", [(conv2d_forward, conv2d_backward),
                                     (conv2d_naive_forward, conv2d_naive_backward)])
@pytest.mark.parametrize("padding", [0, 1, (0, 1, 0, 1)])
def test_conv2d_float32_and_purity(fwd, bwd, padding):
    x, w, b = make_conv(conv_cfg(N=2, H=5, W=4, stride=2, padding=padding), dtype=np.float32)
    y, cache = fwd(x, w, b, stride=2, padding=padding)
    assert y.dtype == np.float32 and y.flags.c_contiguous
    dy = np.random.default_rng(8).standard_normal(y.shape).astype(np.float32)
    grads = list(bwd(dy, cache))
    assert [g.dtype for g in grads] == [np.float32] * 3
    assert grads[0].shape == x.shape  # padding 0 must not give an empty dx
    assert_backward_pure(bwd, dy, cache, grads)


@pytest.mark.parametrize("fwd", [conv2d_forward, conv2d_naive_forward])
def test_conv2d_bad_input(fwd):
    x, w, b = make_conv(conv_cfg(N=1, C_in=2, C_out=3, H=4, W=4))
    cases = [
        (dict(x=x[0]), r"^x must have shape \(N, C_in, H, W\)"),
        (dict(w=w[0]), r"^w must have shape \(C_out, C_in, kh, kw\)"),
        (dict(w=w[:, :1]), r"^w.shape\[1\] \(C_in\) must equal x.shape\[1\]"),
        (dict(x=x.astype(np.int32)), r"^x must be a floating-point"),
        (dict(b=b[:2]), r"^b must have shape"),
        (dict(w=w.astype(np.float32)), r"^w must have the dtype of x"),
        (dict(padding=-1), r"^padding must be an integer >= 0"),
        (dict(padding=(1, 1)), r"^padding must be an int or a 4-tuple"),
        (dict(padding=(0, 0, -1, 0)), r"^padding must be an integer >= 0"),
        (dict(padding=1.0), r"^padding must be an integer"),
        (dict(stride=0), r"^stride must be an integer >= 1"),
        (dict(stride=True), r"^stride must be an integer >= 1"),
        (dict(x=x[:, :, :1, :1]), r"^the padded input \(1, 1\) is smaller than the kernel \(3, 3\)"),
    ]
    for change, match in cases:
        args = dict(x=x, w=w, b=b, stride=1, padding=0) | change
        with pytest.raises(ValueError, match=match):
            fwd(**args)
    y, cache = fwd(x, w, b)
    with pytest.raises(ValueError, match=r"^dy must have shape \(N, C_out, Ho, Wo\)"):
        conv2d_backward(y[:, :, :1], cache)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, (0, 1, 0, 1))])
def test_the_same_code_runs_on_cupy(monkeypatch, stride, padding):
    """On (fake) CuPy the reference runs the same generic array ops, no kernel of minidiff's: bit for bit NumPy's."""
    import fake_cupy
    from minidiff.backend import is_cupy_array

    fake = fake_cupy.install(monkeypatch)
    x, w, b = make_conv(conv_cfg(N=2, C_in=3, C_out=4, H=6, W=5, stride=stride, padding=padding), seed=9)
    dy = np.random.default_rng(10).standard_normal(conv2d_forward(x, w, b, stride, padding)[0].shape)
    y, cache = conv2d_forward(x, w, b, stride, padding)
    want = (y, *conv2d_backward(dy, cache))
    y_d, cache_d = conv2d_forward(fake.asarray(x), fake.asarray(w), fake.asarray(b), stride, padding)
    got = (y_d, *conv2d_backward(fake.asarray(dy), cache_d))
    assert fake.kernels_called == []
    for g, h in zip(got, want):
        assert is_cupy_array(g)
        np.testing.assert_array_equal(np.asarray(g), h)
