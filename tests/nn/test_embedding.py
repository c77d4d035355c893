"""Timestep embedding and label embedding (minidiff/nn/embedding.py): finite differences in float64, PyTorch
autograd, diffusers' get_timestep_embedding, hand values, bad input, and the same numbers on a GPU."""

import math

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from gradcheck import check_grads, rel_error
from minidiff.backend import gpu_available, to_device, to_numpy
from minidiff.nn.embedding import (
    embedding_backward,
    embedding_forward,
    timestep_embedding,
    timestep_embedding_backward,
    timestep_embedding_forward,
)

U32 = 2.0**-24  # float32 unit roundoff


def _angles(t, dim, shift, scale, max_period):
    """|a| and |exponent| per column of emb, in float64 from the equation: (N, dim) each."""
    half = dim // 2
    e = -math.log(max_period) * np.arange(half) / (half - shift)  # (half,)
    a = np.abs(scale * np.asarray(t, np.float64)[:, None] * np.exp(e)[None, :])  # (N, half)
    pad = np.zeros((len(t), dim % 2))
    ee = np.broadcast_to(np.abs(e), a.shape)
    return np.concatenate([a, a, pad], 1), np.concatenate([ee, ee, pad], 1)


# ---------------------------------------------------------------- timestep embedding: values


@pytest.mark.parametrize("flip_sin_to_cos", [False, True])
@pytest.mark.parametrize("downscale_freq_shift", [0.0, 1.0])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos, downscale_freq_shift):
    torch = pytest.importorskip("torch")
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    rng = np.random.default_rng(0)
    # odd dims (zero pad column), dim 1 (all pad), scale != 1, max_period != 10000
    cases = [(32, 1.0, 10000), (33, 1.0, 10000), (7, 0.5, 1000), (1, 1.0, 10000), (16, 3.0, 7), (320, 1.0, 10000),
             (8, 1000.0, 10000)]
    for dim, scale, max_period in cases:
        if dim // 2 == downscale_freq_shift:
            continue
        for t in (rng.integers(0, 1000, 9), rng.uniform(0, 1000, 9)):
            args = (dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period)
            ref = embeddings.get_timestep_embedding(torch.from_numpy(t), *args).numpy().astype(np.float64)
            a, e = _angles(t, dim, downscale_freq_shift, scale, max_period)
            # float32, diffusers' op order: PyTorch's and NumPy's float32 exp each differ from the
            # correctly rounded f_k by up to 1 ulp, so f_k, and then the angle a = t f_k, may differ
            # by 1-2 ulp (2^-23 |a| each), and sin/cos by ~1 ulp more: 8 u (1 + |a|) bounds it
            # (measured worst: 3.8 u (1 + |a|) over dims 1..69, 128, 255, 320, 1024).
            e32 = timestep_embedding(t, *args, dtype=np.float32)
            assert e32.dtype == np.float32 and e32.shape == (9, dim)
            assert np.all(np.abs(e32 - ref) <= 8 * U32 * (1 + a)), args
            # float64 has no float32 rounding; diffusers' exponent, rounded to float32 and times up
            # to ln(max_period), moves f_k by 2 u |exponent|: bound 2 u (|a| (2 |e| + 4) + 2).
            e64 = timestep_embedding(t.astype(np.float64), *args)
            assert e64.dtype == np.float64
            assert np.all(np.abs(e64 - ref) <= 2 * U32 * (a * (2 * e + 4) + 2)), args


@given(n=st.integers(1, 4), dim=st.integers(1, 40), flip=st.booleans(), shift=st.sampled_from([0.0, 1.0, 0.5, -3.0]),
       scale=st.sampled_from([1.0, 0.25, 7.0]), max_period=st.sampled_from([10000, 1000, 10]), seed=st.integers(0, 99))
@example(n=1, dim=2, flip=False, shift=0.0, scale=1.0, max_period=10000, seed=0)
def test_timestep_embedding_float64_equation(n, dim, flip, shift, scale, max_period, seed):
    """Against the equation written differently: f_k = max_period^(-k / (half - shift)), per entry."""
    half = dim // 2
    assume(half != shift)
    t = np.random.default_rng(seed).uniform(-10, 1000, n)
    emb = timestep_embedding(t, dim, flip, shift, scale, max_period)
    ref = np.zeros((n, dim))
    for i in range(n):
        for k in range(half):
            ang = scale * t[i] * max_period ** (-k / (half - shift))
            ref[i, k], ref[i, half + k] = (math.cos(ang), math.sin(ang)) if flip else (math.sin(ang), math.cos(ang))
    # exp(-ln(P) k / (half - shift)) and P^(-k / (half - shift)) differ by a few float64 ulps times
    # (1 + |exponent|), which the angle a carries into sin/cos
    a, e = _angles(t, dim, shift, scale, max_period)
    assert np.all(np.abs(emb - ref) <= 8 * 2.0**-53 * (a * (e + 4) + 2))


def test_timestep_embedding_hand_values():
    # dim 4, shift 1: half 2, f = [1, 10000^-1] ; t = 0 -> sin 0, cos 1
    emb = timestep_embedding(np.array([0.0, 1.0]), 4)
    np.testing.assert_allclose(emb, [[0, 0, 1, 1], [math.sin(1), math.sin(1e-4), math.cos(1), math.cos(1e-4)]],
                               rtol=1e-15, atol=1e-16)
    # UNet2DModel's default (flip_sin_to_cos=True, shift=0): [cos, sin], f = 10000^(-k/2); odd dim pads a zero
    emb = timestep_embedding(np.array([2.0]), 5, flip_sin_to_cos=True, downscale_freq_shift=0)
    np.testing.assert_allclose(emb, [[math.cos(2), math.cos(0.02), math.sin(2), math.sin(0.02), 0]], rtol=1e-15, atol=1e-16)
    # integer t: float32 by default (as diffusers); float t keeps its dtype; dtype= overrides
    assert timestep_embedding(np.array([3, 4]), 6).dtype == np.float32
    assert timestep_embedding(np.array([3.0], dtype=np.float32), 6).dtype == np.float32
    assert timestep_embedding(np.array([3, 4]), 6, dtype=np.float64).dtype == np.float64


# ---------------------------------------------------------------- timestep embedding: gradient


@given(n=st.integers(1, 4), dim=st.integers(1, 12), flip=st.booleans(), shift=st.sampled_from([0.0, 1.0]),
       scale=st.sampled_from([1.0, 0.5, 2.0]), max_period=st.sampled_from([10000, 100]), seed=st.integers(0, 2**16))
@example(n=1, dim=1, flip=False, shift=0.0, scale=1.0, max_period=10000, seed=0)  # no frequencies: dt = 0
@example(n=3, dim=7, flip=True, shift=1.0, scale=2.0, max_period=100, seed=1)  # odd dim, flipped
@example(n=2, dim=8, flip=False, shift=0.0, scale=0.5, max_period=10000, seed=2)
def test_timestep_embedding_gradcheck(n, dim, flip, shift, scale, max_period, seed):
    assume(dim // 2 != shift)
    t = np.random.default_rng(seed).uniform(0, 1000, n)
    opts = (dim, flip, shift, scale, max_period)

    def grads(demb):
        return {"t": timestep_embedding_backward(demb, timestep_embedding_forward(t, *opts)[1])}

    # h = 1e-5, not 1e-6: at t ~ 1000, t +- h is rounded to 1e-13, a 1e-7 error in (L+ - L-) / 2h
    # at h = 1e-6; the O(h^2 scale^3) truncation stays ~1e-10 for scale <= 2
    check_grads(lambda t: timestep_embedding(t, *opts), {"t": t}, grads, seed=seed, h=1e-5)


@pytest.mark.parametrize("flip, shift, dim", [(False, 1.0, 8), (True, 0.0, 9), (True, 1.0, 5), (False, 0.0, 6)])
def test_timestep_embedding_grad_matches_torch(flip, shift, dim):
    """dt against PyTorch autograd of diffusers' formula in float64 (diffusers itself casts to float32)."""
    torch = pytest.importorskip("torch")
    t = np.random.default_rng(3).uniform(0, 1000, 5)
    scale, max_period = 1.5, 5000
    emb, cache = timestep_embedding_forward(t, dim, flip, shift, scale, max_period)
    demb = np.random.default_rng(4).standard_normal(emb.shape)
    dt = timestep_embedding_backward(demb, cache)

    tt = torch.tensor(t, requires_grad=True)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / (half - shift))
    ang = scale * tt[:, None] * freqs[None, :]
    parts = [torch.cos(ang), torch.sin(ang)] if flip else [torch.sin(ang), torch.cos(ang)]
    et = torch.nn.functional.pad(torch.cat(parts, -1), (0, dim % 2))
    et.backward(torch.from_numpy(demb))
    assert rel_error(emb, et.detach().numpy()) < 1e-10
    assert rel_error(dt, tt.grad.numpy()) < 1e-10


def test_timestep_embedding_backward_dtypes_and_no_mutation():
    emb, cache = timestep_embedding_forward(np.array([1, 5, 9]), 6)  # integer t: no gradient
    assert timestep_embedding_backward(np.ones_like(emb), cache) is None
    t = np.array([1.0, 5.5], dtype=np.float32)
    emb, cache = timestep_embedding_forward(t, 7)
    demb = np.ones_like(emb)
    demb0, t0 = demb.copy(), cache[0].copy()
    dt = timestep_embedding_backward(demb, cache)
    assert emb.dtype == np.float32 and dt.dtype == np.float32 and dt.shape == (2,)
    np.testing.assert_array_equal(demb, demb0)
    np.testing.assert_array_equal(cache[0], t0)
    with pytest.raises(ValueError, match="demb"):
        timestep_embedding_backward(np.ones((2, 6), np.float32), cache)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(t=np.zeros((2, 1))), "t"),
        (dict(t=np.array([True, False])), "t"),
        (dict(dim=0), "dim"),
        (dict(dim=4.0), "dim"),
        (dict(dim=4, downscale_freq_shift=2), "downscale_freq_shift"),  # half - shift = 0
        (dict(max_period=0), "max_period"),
        (dict(scale=float("nan")), "scale"),
        (dict(dtype=np.int32), "dtype"),
    ],
)
def test_timestep_embedding_bad_input(kwargs, name):
    args = dict(t=np.array([1.0, 2.0]), dim=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        timestep_embedding(**args)


# ---------------------------------------------------------------- label embedding


@given(v=st.integers(1, 6), d=st.integers(1, 5), ids_shape=st.lists(st.integers(1, 4), max_size=3).map(tuple),
       seed=st.integers(0, 2**16))
@example(v=3, d=2, ids_shape=(8,), seed=0)  # more ids than rows: repeats certain
@example(v=1, d=1, ids_shape=(2, 3), seed=1)  # every id the same row
@example(v=4, d=3, ids_shape=(), seed=2)  # a single 0-d id
def test_embedding_gradcheck(v, d, ids_shape, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, ids_shape)
    weight = rng.standard_normal((v, d))

    def grads(dy):
        return {"weight": embedding_backward(dy, embedding_forward(ids, weight)[1])}

    check_grads(lambda weight: embedding_forward(ids, weight)[0], {"weight": weight}, grads, seed=seed)


def test_embedding_hand_values_repeated_ids():
    weight = np.arange(8.0).reshape(4, 2)
    ids = np.array([[1, 1], [1, 3]])
    y, cache = embedding_forward(ids, weight)
    np.testing.assert_array_equal(y, [[[2, 3], [2, 3]], [[2, 3], [6, 7]]])
    dy = np.array([[[1.0, 10.0], [2.0, 20.0]], [[4.0, 40.0], [8.0, 80.0]]])
    dw = embedding_backward(dy, cache)
    np.testing.assert_array_equal(dw, [[0, 0], [7, 70], [0, 0], [8, 80]])  # row 1 seen 3 times: summed


def test_embedding_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, (3, 7))  # 21 ids into 5 rows: repeats
    weight = rng.standard_normal((5, 4))
    y, cache = embedding_forward(ids, weight)
    dy = rng.standard_normal(y.shape)
    dw = embedding_backward(dy, cache)
    wt = torch.tensor(weight, requires_grad=True)
    yt = torch.nn.functional.embedding(torch.from_numpy(ids), wt)
    yt.backward(torch.from_numpy(dy))
    assert rel_error(y, yt.detach().numpy()) < 1e-10
    assert rel_error(dw, wt.grad.numpy()) < 1e-10


def test_embedding_float32_and_no_mutation():
    ids = np.array([0, 2, 2])
    y, cache = embedding_forward(ids, np.ones((3, 4), np.float32))
    assert y.dtype == np.float32
    dy = np.ones_like(y)
    dy0, ids0 = dy.copy(), ids.copy()
    dw = embedding_backward(dy, cache)
    assert dw.dtype == np.float32
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(cache[0], ids0)


@pytest.mark.parametrize(
    "ids, weight, name",
    [
        (np.array([0, 3]), np.ones((3, 2)), "ids"),  # 3 >= V
        (np.array([-1, 0]), np.ones((3, 2)), "ids"),  # negative ids are not wrapped
        (np.array([0.0, 1.0]), np.ones((3, 2)), "ids"),  # float ids
        (np.array([True, False]), np.ones((3, 2)), "ids"),
        (np.array([0, 1]), np.ones(3), "weight"),
        (np.array([0, 1]), np.ones((3, 2), np.int64), "weight"),
    ],
)
def test_embedding_bad_input(ids, weight, name):
    with pytest.raises(ValueError, match=name):
        embedding_forward(ids, weight)


def test_embedding_backward_bad_dy():
    _, cache = embedding_forward(np.array([0, 1]), np.ones((3, 2)))
    with pytest.raises(ValueError, match="dy"):
        embedding_backward(np.ones((2, 3)), cache)


# ---------------------------------------------------------------- GPU parity (skips without CuPy + GPU)


@pytest.mark.gpu
def test_embedding_gpu_matches_cpu():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1000, 6)
    emb, c = timestep_embedding_forward(t, 33, True, 0.0)
    embg, cg = timestep_embedding_forward(to_device(t, "gpu"), 33, True, 0.0)
    demb = rng.standard_normal(emb.shape)
    assert rel_error(emb, to_numpy(embg)) < 1e-12
    assert rel_error(timestep_embedding_backward(demb, c),
                     to_numpy(timestep_embedding_backward(to_device(demb, "gpu"), cg))) < 1e-10
    ids, weight = rng.integers(0, 4, (5, 3)), rng.standard_normal((4, 6))  # repeats: atomic scatter-add
    y, c = embedding_forward(ids, weight)
    yg, cg = embedding_forward(to_device(ids, "gpu"), to_device(weight, "gpu"))
    dy = rng.standard_normal(y.shape)
    assert rel_error(y, to_numpy(yg)) == 0
    assert rel_error(embedding_backward(dy, c), to_numpy(embedding_backward(to_device(dy, "gpu"), cg))) < 1e-12
    with pytest.raises(ValueError, match="ids"):
        embedding_forward(to_device(np.array([4]), "gpu"), to_device(weight, "gpu"))  # CuPy itself would not raise
