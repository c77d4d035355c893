"""resample (minidiff/nn/resample.py: nearest 2x upsampling, stride-2 conv downsampling, 2x2 average pooling):
finite differences, PyTorch autograd and diffusers parity, dtype, no mutation, bad input.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_grads, check_weight_bias_grads, needs, rel_error
from minidiff.nn.resample import (
    avgpool2x2_backward,
    avgpool2x2_forward,
    downsample_backward,
    downsample_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)
from purity import assert_backward_pure

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


def randn(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def nchw(min_hw=1):
    return st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(min_hw, 5), st.integers(min_hw, 5))


def torch_grad_check(torch, fn_t, inputs, y, dy, grads, tol=1e-10):
    """fn_t(*tensors) vs our y and grads, in float64, through torch autograd with upstream dy."""
    ts = [None if a is None else torch.tensor(a, requires_grad=True) for a in inputs]
    yt = fn_t(*ts)
    yt.backward(torch.tensor(dy))
    assert rel_error(y, yt.detach().numpy()) < tol
    for g, t in zip(grads, ts):
        assert (g is None) == (t is None)
        if t is not None:
            assert rel_error(g, t.grad.numpy()) < tol


# --------------------------------------------------------------------------------- upsample / avgpool

def upsample_case(fn):
    fn = example(shape=(2, 3, 3, 5))(fn)  # odd sizes
    fn = example(shape=(1, 1, 1, 1))(fn)  # 1x1 spatial, batch 1
    return given(shape=nchw())(fn)


def avgpool_case(fn):
    fn = example(shape=(2, 2, 5, 3))(fn)  # odd sizes: the last row/column is dropped (floor mode)
    fn = example(shape=(1, 1, 2, 2))(fn)  # a single 2x2 block
    return given(shape=nchw(min_hw=2))(fn)


@upsample_case
def test_upsample_finite_differences(shape):
    x = randn(shape)
    check_grads(lambda x: upsample_nearest2x_forward(x)[0], dict(x=x),
                lambda g: dict(x=upsample_nearest2x_backward(g, upsample_nearest2x_forward(x)[1])),
                max_coords=MAX_COORDS)


@needs("torch")
@upsample_case
def test_upsample_matches_torch(shape):
    torch = pytest.importorskip("torch")
    x = randn(shape)
    y, cache = upsample_nearest2x_forward(x)
    assert y.shape == shape[:2] + (2 * shape[2], 2 * shape[3])
    dy = randn(y.shape, seed=1)
    torch_grad_check(torch, lambda t: torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest"),
                     [x], y, dy, [upsample_nearest2x_backward(dy, cache)])


@avgpool_case
def test_avgpool_finite_differences(shape):
    x = randn(shape)
    check_grads(lambda x: avgpool2x2_forward(x)[0], dict(x=x),
                lambda g: dict(x=avgpool2x2_backward(g, avgpool2x2_forward(x)[1])), max_coords=MAX_COORDS)


@needs("torch")
@avgpool_case
def test_avgpool_matches_torch(shape):
    torch = pytest.importorskip("torch")
    x = randn(shape)
    y, cache = avgpool2x2_forward(x)
    assert y.shape == shape[:2] + (shape[2] // 2, shape[3] // 2)
    dy = randn(y.shape, seed=1)
    torch_grad_check(torch, lambda t: torch.nn.functional.avg_pool2d(t, 2, 2), [x], y, dy,
                     [avgpool2x2_backward(dy, cache)])


# ----------------------------------------------------------------------------------------- downsample

@st.composite
def down_cfgs(draw):
    padding = draw(st.integers(0, 2))
    lo = 2 if padding == 0 else 1  # padding 0 adds one row/column, and the kernel is 3x3
    N, C_in, H, W = draw(st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(lo, 7), st.integers(lo, 7)))
    return dict(shape=(N, C_in, H, W), C_out=draw(st.integers(1, 3)), padding=padding, bias=draw(st.booleans()))


def make_down(cfg, seed=0, dtype=np.float64):
    x = randn(cfg["shape"], seed, dtype)
    w = randn((cfg["C_out"], cfg["shape"][1], 3, 3), seed + 1, dtype)
    b = randn(cfg["C_out"], seed + 2, dtype) if cfg["bias"] else None
    return x, w, b


DOWN_EDGE_CASES = [
    dict(shape=(1, 2, 4, 4), C_out=2, padding=0, bias=True),  # diffusers' padding=0 variant, even size
    dict(shape=(2, 1, 5, 3), C_out=3, padding=0, bias=False),  # ... odd sizes, no bias
    dict(shape=(1, 2, 1, 1), C_out=1, padding=1, bias=True),  # 1x1 spatial
    dict(shape=(1, 3, 6, 7), C_out=2, padding=1, bias=True),  # the default padding=1
]


def down_case(fn):
    fn = given(cfg=down_cfgs())(fn)
    for cfg in DOWN_EDGE_CASES:
        fn = example(cfg=cfg)(fn)
    return fn


@down_case
def test_downsample_finite_differences(cfg):
    x, w, b = make_down(cfg)

    def forward(x, w, b=None):
        return downsample_forward(x, w, b, padding=cfg["padding"])

    check_weight_bias_grads(forward, downsample_backward, x, w, b, MAX_COORDS)


@needs("torch")
@down_case
def test_downsample_matches_torch(cfg):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, w, b = make_down(cfg, seed=3)
    p = cfg["padding"]
    y, cache = downsample_forward(x, w, b, padding=p)
    H, W = cfg["shape"][2:]
    if p == 0:
        assert y.shape[2:] == ((H - 2) // 2 + 1, (W - 2) // 2 + 1)  # = H // 2, W // 2 for even sizes
    dy = randn(y.shape, seed=4)

    def down_t(xt, wt, bt):
        if p == 0:  # diffusers Downsample2D: F.pad(x, (0, 1, 0, 1)) then conv(padding=0)
            return F.conv2d(F.pad(xt, (0, 1, 0, 1)), wt, bt, stride=2)
        return F.conv2d(xt, wt, bt, stride=2, padding=p)

    torch_grad_check(torch, down_t, [x, w, b], y, dy, list(downsample_backward(dy, cache)))


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample_and_avgpool_match_diffusers(padding):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.models.downsampling import Downsample2D

    x = randn((2, 3, 6, 5), seed=5)
    layer = Downsample2D(3, use_conv=True, out_channels=4, padding=padding).double()
    w, b = layer.conv.weight.detach().numpy().copy(), layer.conv.bias.detach().numpy().copy()
    y, cache = downsample_forward(x, w, b, padding=padding)
    dy = randn(y.shape, seed=6)
    xt = torch.tensor(x, requires_grad=True)
    yt = layer(xt)
    yt.backward(torch.tensor(dy))
    dx, dw, db = downsample_backward(dy, cache)
    assert rel_error(y, yt.detach().numpy()) < 1e-10
    assert rel_error(dx, xt.grad.numpy()) < 1e-10
    assert rel_error(dw, layer.conv.weight.grad.numpy()) < 1e-10
    assert rel_error(db, layer.conv.bias.grad.numpy()) < 1e-10

    pool = Downsample2D(3, use_conv=False).double()
    assert rel_error(avgpool2x2_forward(x)[0], pool(torch.tensor(x)).numpy()) < 1e-12


# -------------------------------------------------------------------------------- dtype and purity

def test_resample_float32_in_float32_out_and_backward_is_pure():
    x = randn((2, 3, 5, 4), dtype=np.float32)
    w, b = randn((2, 3, 3, 3), 1, np.float32), randn(2, 2, np.float32)
    ops = [
        (lambda: upsample_nearest2x_forward(x), upsample_nearest2x_backward),
        (lambda: avgpool2x2_forward(x), avgpool2x2_backward),
        (lambda: downsample_forward(x, w, b, padding=0), downsample_backward),
        (lambda: downsample_forward(x, w, b, padding=1), downsample_backward),
    ]
    for fwd, bwd in ops:
        y, cache = fwd()
        assert y.dtype == np.float32
        dy = randn(y.shape, 3, np.float32)
        out = bwd(dy, cache)
        grads = list(out) if isinstance(out, tuple) else [out]
        assert [g.dtype for g in grads] == [np.float32] * len(grads)
        assert grads[0].shape == x.shape
        assert_backward_pure(lambda d, c: (lambda o: o if isinstance(o, tuple) else (o,))(bwd(d, c)),
                             dy, cache, grads)


# ---------------------------------------------------------------------------------------- bad input

def test_resample_bad_input():
    x = randn((1, 2, 4, 4))
    w = randn((3, 2, 3, 3), 1)
    with pytest.raises(ValueError, match=r"^x must have shape \(N, C, H, W\)"):
        upsample_nearest2x_forward(x[0])
    with pytest.raises(ValueError, match=r"^x must be a floating-point"):
        upsample_nearest2x_forward(x.astype(np.int64))
    with pytest.raises(ValueError, match=r"^x must have H, W >= 2"):
        avgpool2x2_forward(x[:, :, :1])
    with pytest.raises(ValueError, match=r"^x must be a floating-point"):
        avgpool2x2_forward(x.astype(np.int32))
    with pytest.raises(ValueError, match=r"^padding must be an integer >= 0"):
        downsample_forward(x, w, None, padding=-1)
    with pytest.raises(ValueError, match=r"^padding must be an integer >= 0"):
        downsample_forward(x, w, None, padding="same")
    with pytest.raises(ValueError, match=r"^w.shape\[1\] \(C_in\) must equal"):
        downsample_forward(x, w[:, :1], None)
    with pytest.raises(ValueError, match=r"^dy must have shape"):
        upsample_nearest2x_backward(x, upsample_nearest2x_forward(x)[1])
