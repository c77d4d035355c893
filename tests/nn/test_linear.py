"""linear (minidiff/nn/linear.py): finite differences, PyTorch autograd, dtype, no mutation, bad input.

Shapes are tiny on purpose (CI runs on 2 cores); hypothesis picks them, including the edge cases
(1-D x, batch 1, tokens, bias None) and the @example rows pin those edge cases for every run.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_weight_bias_against_torch, check_weight_bias_grads
from minidiff.nn.linear import linear_backward, linear_forward
from purity import assert_backward_pure

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


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
