"""mse (minidiff/nn/mse.py): finite differences, PyTorch autograd, dtype (a float64 dloss keeps float32
gradients), no mutation, bad input.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_grads, needs, rel_error
from minidiff.nn.mse import mse_backward, mse_forward
from purity import assert_backward_pure

MAX_COORDS = 40  # finite-difference coordinates checked per input (a seeded random subset)


def randn(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


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


# ------------------------------------------------------------------------------------------------ mse

def mse_case(fn):
    fn = example(shape=(2, 3, 4))(fn)
    fn = example(shape=(1, 1, 1, 1))(fn)
    fn = example(shape=())(fn)  # 0-d pred and target
    return given(shape=st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple))(fn)


@mse_case
def test_mse_finite_differences(shape):
    pred, target = randn(shape, seed=0), randn(shape, seed=1)
    check_grads(lambda pred, target: mse_forward(pred, target)[0], dict(pred=pred, target=target),
                lambda g: dict(zip(("pred", "target"), mse_backward(g, mse_forward(pred, target)[1]))),
                max_coords=MAX_COORDS)


@needs("torch")
@mse_case
def test_mse_matches_torch(shape):
    torch = pytest.importorskip("torch")
    pred, target = randn(shape, seed=0), randn(shape, seed=1)
    loss, cache = mse_forward(pred, target)
    assert isinstance(loss, np.ndarray) and loss.shape == ()
    dloss = 0.7
    grads = list(mse_backward(dloss, cache))
    assert all(isinstance(g, np.ndarray) and g.shape == shape for g in grads)  # 0-d arrays, not scalars
    torch_grad_check(torch, torch.nn.functional.mse_loss, [pred, target], loss, np.asarray(dloss), grads)


# -------------------------------------------------------------------------------- dtype and purity

def test_mse_float32_in_float32_out_and_backward_is_pure():
    pred, target = randn((2, 3), 4, np.float32), randn((2, 3), 5, np.float32)
    loss, cache = mse_forward(pred, target)
    assert isinstance(loss, np.ndarray) and loss.shape == () and loss.dtype == np.float32
    for dloss in (1.0, np.float64(1.0), np.asarray(1.0)):  # a float64 dloss must not upcast the grads
        dpred, dtarget = mse_backward(dloss, cache)
        assert dpred.dtype == dtarget.dtype == np.float32
    assert_backward_pure(mse_backward, np.asarray(2.0, np.float32), cache, [dpred, dtarget])


# ---------------------------------------------------------------------------------------- bad input

def test_mse_bad_input():
    x = randn((1, 2, 4, 4))
    with pytest.raises(ValueError, match=r"^target must have shape"):
        mse_forward(x, x[0])
    with pytest.raises(ValueError, match=r"^target must be a floating-point"):
        mse_forward(x, x.astype(np.int64))
    with pytest.raises(ValueError, match=r"^target must have the dtype of pred"):
        mse_forward(x, x.astype(np.float32))
    with pytest.raises(ValueError, match=r"^pred must have at least one entry"):
        mse_forward(x[:0], x[:0])
    with pytest.raises(ValueError, match=r"^dloss must be a scalar or a 0-d array"):
        mse_backward(np.ones(2), mse_forward(x, x)[1])
