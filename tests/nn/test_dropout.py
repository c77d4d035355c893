"""Dropout (minidiff/nn/dropout.py) and its seeded masks (minidiff/nn/splitmix64.py): finite differences in
float64, PyTorch autograd, the reference SplitMix64 outputs, seeds and masks, keep rate, bad input, and the
same numbers on a GPU."""

import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gradcheck import check_grads, rel_error
from minidiff.backend import gpu_available, to_device, to_numpy
from minidiff.nn import dropout as dropout_module
from minidiff.nn.dropout import dropout_backward, dropout_forward, dropout_mask
from minidiff.nn.splitmix64 import splitmix64

# ---------------------------------------------------------------- dropout


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), p=st.sampled_from([0.1, 0.5, 0.9]),
       seed=st.integers(0, 2**16))
@example(shape=(1,), p=0.5, seed=0)
def test_dropout_gradcheck(shape, p, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    mask = rng.random(shape) >= p

    def grads(dy):
        return {"x": dropout_backward(dy, dropout_forward(x, p, mask=mask)[1])}

    check_grads(lambda x: dropout_forward(x, p, mask=mask)[0], {"x": x}, grads, seed=seed)


def reference_splitmix64(seed):
    """The reference generator (splitmix64.c), one output at a time, in Python integers."""
    state, m = seed % 2**64, 2**64 - 1
    while True:
        state = (state + 0x9E3779B97F4A7C15) & m
        z = ((state ^ (state >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        yield z ^ (z >> 31)


def test_splitmix64_gives_the_reference_outputs():
    # the published first outputs for seed 1234567 (Rosetta Code, "Pseudo-random numbers/Splitmix64")
    want = [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431,
            16408922859458223821]
    assert splitmix64(1234567, 0, 5).tolist() == want
    assert splitmix64(1234567, 3, 5).tolist() == want[3:]  # any range, computed directly
    reference = reference_splitmix64(2**64 + 5)  # keys are taken mod 2^64
    assert splitmix64(5, 0, 1000).tolist() == [next(reference) for _ in range(1000)]
    with pytest.raises(ValueError, match="key"):
        splitmix64(1.5, 0, 3)


@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple), p=st.floats(0.0, 0.99),
       seed=st.integers(0, 2**70), piece=st.sampled_from([1, 7, 2**16]))
def test_dropout_mask_rows_and_pieces_are_slices_of_one_stream(shape, p, seed, piece):
    with mock.patch.object(dropout_module, "PIECE", piece):
        whole = dropout_mask(seed, shape, p)
        assert whole.shape == shape and whole.dtype == np.bool_
        for start in range(shape[0]):
            np.testing.assert_array_equal(dropout_mask(seed, shape, p, rows=(start, shape[0])), whole[start:])
    with mock.patch.object(dropout_module, "PIECE", 2**16):
        np.testing.assert_array_equal(dropout_mask(seed, shape, p), whole)


def test_dropout_seed_mask_and_identity():
    x = np.random.default_rng(0).standard_normal((8, 16)) + 5.0  # no zeros: y == 0 exactly where dropped
    y1, _ = dropout_forward(x, 0.4, seed=123)
    y2, _ = dropout_forward(x, 0.4, seed=123)
    y3, _ = dropout_forward(x, 0.4, seed=124)
    np.testing.assert_array_equal(y1, y2)
    assert np.any((y1 == 0) != (y3 == 0))
    # the seeded mask: entry i kept when the i-th output of SplitMix64 seeded with 123 is >= 0.4 * 2^64
    reference = reference_splitmix64(123)
    want = np.array([next(reference) >= int(0.4 * 2.0**64) for _ in range(x.size)]).reshape(x.shape)
    np.testing.assert_array_equal(y1 != 0, want)
    # an explicit mask is used as given, kept entries scaled by 1 / (1 - p)
    mask = np.zeros(x.shape, bool)
    mask[::2, 1::3] = True
    y, cache = dropout_forward(x, 0.25, mask=mask, seed=123)
    np.testing.assert_allclose(y, np.where(mask, x / 0.75, 0.0), rtol=1e-15)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    np.testing.assert_allclose(dropout_backward(dy, cache), np.where(mask, dy / 0.75, 0.0), rtol=1e-15)
    # p = 0 or train=False: the identity, as new arrays (also with a mask given)
    for kwargs in (dict(p=0.0), dict(p=0.5, train=False), dict(p=0.5, train=False, mask=mask)):
        y, cache = dropout_forward(x, **kwargs)
        dx = dropout_backward(dy, cache)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dx, dy)
        assert y is not x and not np.shares_memory(y, x) and not np.shares_memory(dx, dy)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keep_rate(p):
    x = np.ones((100, 200), np.float32)
    y, _ = dropout_forward(x, p, seed=7)
    keep = y != 0
    # 20000 Bernoulli(1 - p) draws: standard deviation <= 0.0036; 5 sigma
    assert abs(keep.mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / keep.size)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y[keep], 1 / (1 - p), rtol=1e-6)
    np.testing.assert_allclose(y.mean(), 1.0, atol=0.05)  # inverted dropout keeps the mean


def test_dropout_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((4, 6, 5)) + 10.0  # no zeros
    p = 0.3
    xt = torch.tensor(x, requires_grad=True)
    torch.manual_seed(0)
    yt = torch.nn.functional.dropout(xt, p, training=True)
    dy = np.random.default_rng(1).standard_normal(x.shape)
    yt.backward(torch.from_numpy(dy))
    mask = yt.detach().numpy() != 0  # PyTorch's mask, recovered from its output
    y, cache = dropout_forward(x, p, mask=mask)
    assert rel_error(y, yt.detach().numpy()) < 1e-10
    assert rel_error(dropout_backward(dy, cache), xt.grad.numpy()) < 1e-10


def test_dropout_no_mutation_float32():
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    y, cache = dropout_forward(x, 0.5, seed=1)
    assert y.dtype == np.float32
    dy = np.ones_like(y)
    dy0, mask0 = dy.copy(), cache[0][0].copy()
    dx = dropout_backward(dy, cache)
    assert dx.dtype == np.float32
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(cache[0][0], mask0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(p=1.0), "p"),
        (dict(p=-0.1), "p"),
        (dict(p=1.5), "p"),
        (dict(p=True), "p"),
        (dict(p="0.1"), "p"),
        (dict(p=float("nan")), "p"),
        (dict(x=np.ones((2, 3), np.int64)), "x"),
        (dict(mask=np.ones((2, 2), bool)), "mask"),
        (dict(mask=np.ones((2, 3))), "mask"),
    ],
)
def test_dropout_bad_input(kwargs, name):
    args = dict(x=np.ones((2, 3)), p=0.5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        dropout_forward(**args)


# ---------------------------------------------------------------- GPU parity (skips without CuPy + GPU)


@pytest.mark.gpu
def test_dropout_gpu_matches_cpu():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 9)) + 3.0
    y, _ = dropout_forward(x, 0.3, seed=5)
    yg, _ = dropout_forward(to_device(x, "gpu"), 0.3, seed=5)  # the same host-drawn mask
    assert rel_error(y, to_numpy(yg)) < 1e-15


def test_dropout_mask_rejects_rows_outside_the_batch():
    for rows in ((-1, 2), (2, 1), (0, 5)):
        with pytest.raises(ValueError, match="rows"):
            dropout_mask(1, (4, 3), 0.5, rows=rows)
    with pytest.raises(ValueError, match="seed"):
        dropout_mask("abc", (4, 3), 0.5)
    assert dropout_mask(1, (4, 3), 0.5, rows=(2, 2)).shape == (0, 3)
