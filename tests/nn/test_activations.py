"""SiLU (nn/activations.py): finite differences in float64, PyTorch autograd, hand values, no overflow, bad input.

Moved from tests/test_nn_norm_act.py (the GroupNorm half is tests/nn/test_groupnorm.py); the fast
versions are checked against these functions in tests/fast/test_norm.py.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_grads, rel_error
from minidiff.backend import gpu_available, to_device, to_numpy
from minidiff.nn.activations import silu_backward, silu_forward


def _snapshot(obj):
    """Deep copy of a cache (tuples of arrays and plain values) for no-mutation checks."""
    if isinstance(obj, tuple):
        return tuple(_snapshot(o) for o in obj)
    return obj.copy() if isinstance(obj, np.ndarray) else obj


def _assert_same(a, b):
    if isinstance(a, tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


# ---------------------------------------------------------------- silu


@given(shape=st.lists(st.integers(1, 4), max_size=4).map(tuple), scale=st.sampled_from([0.5, 3.0, 20.0]),
       seed=st.integers(0, 2**16))
@example(shape=(), scale=3.0, seed=0)  # 0-d array
@example(shape=(1, 1), scale=20.0, seed=1)
@example(shape=(4, 4, 4, 4), scale=20.0, seed=3)  # found: rounding floor of the differences at h = 1e-6
@example(shape=(), scale=3.0, seed=190)  # found: a gradient near 0 (truncation of the differences at h = 1e-4)
@example(shape=(), scale=20.0, seed=127)  # x = -32.2: the tanh form of sigma lost its relative accuracy there
def test_silu_gradcheck(shape, scale, seed):
    x = np.asarray(np.random.default_rng(seed).standard_normal(shape) * scale)  # 0-d stays an array

    def grads(dy):
        return {"x": silu_backward(dy, silu_forward(x)[1])}

    # h = 1e-5: with |x| up to ~60 the differences' rounding floor eps * sum|dy y| / h reached 1.2e-7
    # of the gradient at h = 1e-6 (found: shape=(4, 4, 4, 4), scale=20, seed=3); at h = 1e-4 the
    # O(h^2 f3 / 6) truncation (f3, silu's third derivative, is at most 0.31) was 1.1e-7 of a gradient
    # near silu's minimum, -0.0043 at x = -1.30 (found: shape=(), scale=3, seed=190)
    check_grads(lambda x: silu_forward(x)[0], {"x": x}, grads, seed=seed, h=1e-5)


def test_silu_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.concatenate([np.random.default_rng(0).standard_normal(50) * 4, [0.0, -1e3, 1e3, -40.0, 40.0, 1e-8]])
    y, cache = silu_forward(x)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    dx = silu_backward(dy, cache)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.silu(xt)
    yt.backward(torch.from_numpy(dy))
    assert rel_error(y, yt.detach().numpy()) < 1e-10
    assert rel_error(dx, xt.grad.numpy()) < 1e-10


def test_silu_hand_values_and_no_overflow():
    x = np.array([0.0, 1.0, -1.0, 100.0, -100.0, -1000.0], dtype=np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y, cache = silu_forward(x)
        dx = silu_backward(np.ones_like(x), cache)
    s1 = 1 / (1 + np.exp(-1.0))
    np.testing.assert_allclose(y, [0.0, s1, -(1 - s1), 100.0, 0.0, 0.0], rtol=1e-6, atol=1e-30)
    # silu'(x) = s (1 + x (1 - s)): 1/2 at 0, 1 for large x, 0 for very negative x
    np.testing.assert_allclose(dx, [0.5, s1 * (1 + (1 - s1)), (1 - s1) * (1 - s1), 1.0, 0.0, 0.0],
                               rtol=1e-6, atol=1e-30)
    assert y.dtype == np.float32 and dx.dtype == np.float32


def test_silu_no_mutation_and_bad_input():
    x = np.random.default_rng(0).standard_normal((3, 4))
    y, cache = silu_forward(x)
    dy = np.ones_like(y)
    dy0, cache0 = dy.copy(), _snapshot(cache)
    silu_backward(dy, cache)
    np.testing.assert_array_equal(dy, dy0)
    _assert_same(cache, cache0)
    with pytest.raises(ValueError, match="x"):
        silu_forward(np.arange(4))
    with pytest.raises(ValueError, match="dy"):
        silu_backward(np.ones((4, 3)), cache)


# ---------------------------------------------------------------- GPU parity (skips without CuPy + GPU)


@pytest.mark.gpu
def test_silu_gpu_matches_cpu():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 6, 5, 3)) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)  # the GroupNorm test's x
    dy = np.random.default_rng(12).standard_normal(x.shape)
    ys, cs = silu_forward(x)
    ysg, csg = silu_forward(to_device(x, "gpu"))
    assert rel_error(ys, to_numpy(ysg)) < 1e-12
    assert rel_error(silu_backward(dy, cs), to_numpy(silu_backward(to_device(dy, "gpu"), csg))) < 1e-12
