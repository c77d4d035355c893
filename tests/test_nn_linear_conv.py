"""linear and conv2d: finite differences, naive == fast, PyTorch autograd, dtype, no mutation, bad input.

Shapes are tiny on purpose (CI runs on 2 cores); hypothesis picks them, including the edge cases
(padding 0, stride 2, 1x1 spatial, odd sizes, batch 1, kernel 1 and 3, bias None) and the
@example rows pin those edge cases for every run.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_weight_bias_against_torch, check_weight_bias_grads, needs, rel_error
from minidiff.nn.conv2d import conv2d_backward, conv2d_forward
from minidiff.nn.conv2d_naive import conv2d_naive_backward, conv2d_naive_forward
from minidiff.nn.linear import linear_backward, linear_forward

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


def snapshot(obj):
    """A deep copy of the arrays in a (nested) cache, to detect mutation by backward."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (tuple, list)):
        return type(obj)(snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return obj


def assert_same(a, b):
    """Structural equality of two snapshots (arrays compared exactly)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def arrays_in(obj):
    """Every ndarray inside a (nested) cache."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for o in obj for a in arrays_in(o)]
    if isinstance(obj, dict):
        return [a for o in obj.values() for a in arrays_in(o)]
    return []


def assert_backward_pure(backward, dy, cache, grads):
    """backward(dy, cache) left dy and the cache unchanged and returned arrays sharing no memory with them."""
    dy0, cache0 = dy.copy(), snapshot(cache)
    out = backward(dy, cache)
    assert np.array_equal(dy, dy0)
    assert_same(snapshot(cache), cache0)
    for g in grads + [o for o in out if o is not None]:
        for a in [dy] + arrays_in(cache):
            assert not np.shares_memory(g, a)


# ----------------------------------------------------------------------------------------- linear

@st.composite
def linear_cfgs(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    return dict(lead=lead, fin=draw(st.integers(1, 4)), fout=draw(st.integers(1, 4)), bias=draw(st.booleans()))


def make_linear(cfg, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(cfg["lead"] + (cfg["fin"],)).astype(dtype)
    w = rng.standard_normal((cfg["fout"], cfg["fin"])).astype(dtype)
    b = rng.standard_normal(cfg["fout"]).astype(dtype) if cfg["bias"] else None
    return x, w, b


@given(cfg=linear_cfgs())
@example(cfg=dict(lead=(), fin=1, fout=1, bias=False))  # 1-D x, no bias
@example(cfg=dict(lead=(1,), fin=3, fout=2, bias=True))  # batch 1
@example(cfg=dict(lead=(2, 3), fin=4, fout=3, bias=True))  # tokens (N, L, in)
def test_linear_finite_differences(cfg):
    x, w, b = make_linear(cfg)
    check_weight_bias_grads(linear_forward, linear_backward, x, w, b, MAX_COORDS)


@given(cfg=linear_cfgs())
def test_linear_matches_torch(cfg):
    torch = pytest.importorskip("torch")
    x, w, b = make_linear(cfg, seed=1)
    check_weight_bias_against_torch(torch, linear_forward, linear_backward, torch.nn.functional.linear, x, w, b,
                                    seed=2)


def test_linear_float32_and_purity():
    x, w, b = make_linear(dict(lead=(2, 3), fin=4, fout=5, bias=True), dtype=np.float32)
    y, cache = linear_forward(x, w, b)
    assert y.dtype == np.float32 and y.shape == (2, 3, 5)
    dy = np.random.default_rng(3).standard_normal(y.shape).astype(np.float32)
    grads = list(linear_backward(dy, cache))
    assert [g.dtype for g in grads] == [np.float32] * 3
    assert_backward_pure(linear_backward, dy, cache, grads)


def test_linear_bad_input():
    x, w, b = make_linear(dict(lead=(2,), fin=3, fout=4, bias=True))
    with pytest.raises(ValueError, match=r"^w must have shape \(out, in\)"):
        linear_forward(x, w[0], b)
    with pytest.raises(ValueError, match=r"^x's last dim"):
        linear_forward(x[:, :2], w, b)
    with pytest.raises(ValueError, match=r"^x must be a floating-point"):
        linear_forward(x.astype(np.int64), w, b)
    with pytest.raises(ValueError, match=r"^b must have shape"):
        linear_forward(x, w, b[:2])
    with pytest.raises(ValueError, match=r"^w must have the dtype of x"):
        linear_forward(x, w.astype(np.float32), b)


# ----------------------------------------------------------------------------------------- conv2d

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
def test_conv2d_naive_equals_fast(cfg):
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


@pytest.mark.parametrize("fwd,bwd", [(conv2d_forward, conv2d_backward),
                                     (conv2d_naive_forward, conv2d_naive_backward)])
@pytest.mark.parametrize("padding", [0, 1, (0, 1, 0, 1)])
def test_conv2d_float32_and_purity(fwd, bwd, padding):
    x, w, b = make_conv(conv_cfg(N=2, H=5, W=4, stride=2, padding=padding), dtype=np.float32)
    y, cache = fwd(x, w, b, stride=2, padding=padding)
    assert y.dtype == np.float32
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
