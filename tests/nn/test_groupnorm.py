"""GroupNorm (nn/groupnorm.py): finite differences in float64, PyTorch autograd, hand values, bad input.

Moved from tests/test_nn_norm_act.py (the SiLU half is tests/nn/test_activations.py); the fast
versions are checked against these functions in tests/fast/test_norm.py.
"""

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from gradcheck import needs, numeric_grad, rel_error
from minidiff.backend import gpu_available, to_device, to_numpy
from minidiff.nn.groupnorm import groupnorm_backward, groupnorm_forward

# ---------------------------------------------------------------- helpers


def _gn_inputs(n, g, cg, spatial, seed, dtype=np.float64):
    """x (N, C, *spatial) = s * N(0, 1) + o (a random scale s and offset o), gamma (C,), beta (C,)."""
    rng = np.random.default_rng(seed)
    c = g * cg
    x = rng.standard_normal((n, c) + tuple(spatial)) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)
    gamma = rng.standard_normal(c)
    beta = rng.standard_normal(c)
    return x.astype(dtype), gamma.astype(dtype), beta.astype(dtype)


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


def _rel_error_floor(a, b, floor):
    """max|a - b| / max(|a|, |b|, floor): rel_error that does not divide noise by noise near 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), floor))


def _check_grads_floor(forward, inputs, dy, analytic, floors, h=1e-6, tol=1e-7, max_coords=200):
    """gradcheck.check_grads for a given upstream dy, with rel errors against max(|a|, |b|, floor)."""
    for name, ga in analytic.items():
        idx, gn = numeric_grad(lambda: float(np.sum(dy * forward(**inputs))), inputs[name], h, max_coords)
        err = _rel_error_floor(ga.reshape(-1)[idx], gn, floors.get(name, 1e-300))
        assert err < tol, f"gradient of {name}: relative error {err:.3e} >= {tol:.0e}"


gn_shapes = dict(
    n=st.integers(1, 2),
    g=st.integers(1, 4),
    cg=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 3), max_size=3).map(tuple),
    seed=st.integers(0, 2**16),
)

# ---------------------------------------------------------------- groupnorm


@given(**gn_shapes)
@example(n=1, g=1, cg=4, spatial=(3, 5), seed=0)  # one group, odd sizes, batch 1
@example(n=2, g=4, cg=1, spatial=(1, 1), seed=1)  # groups = channels, 1x1 spatial: groups of 1 (var 0)
@example(n=2, g=3, cg=2, spatial=(), seed=2)  # no spatial dims: x (N, C)
@example(n=1, g=2, cg=3, spatial=(1, 1), seed=3)  # 1x1 spatial, several channels per group
@example(n=2, g=2, cg=2, spatial=(3,), seed=4)  # one spatial dim
@example(n=1, g=1, cg=1, spatial=(3,), seed=0)  # found: dx nearly cancels (see dx_scale below)
@example(n=2, g=1, cg=1, spatial=(2, 2), seed=1715)  # found: dbeta nearly cancels (see floors below)
@example(n=2, g=1, cg=1, spatial=(2, 2, 3), seed=4)  # found: small gamma (see y - beta below)
def test_groupnorm_gradcheck(n, g, cg, spatial, seed):
    x, gamma, beta = _gn_inputs(n, g, cg, spatial, seed)
    # A group of M = 2 elements normalizes to xhat = +-d / sqrt(d^2 + 4 eps) (d their difference),
    # which hardly depends on x: dx = O(eps / d^3), ~1e-5 of the O(1) loss at eps = 1e-5, below
    # what differences resolve (found by the seed=2 example). eps = 1 keeps that case sharp.
    eps = 1.0 if cg * int(np.prod(spatial)) == 2 else 1e-5
    y, cache = groupnorm_forward(x, gamma, beta, g, eps)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dx, dgamma, dbeta = groupnorm_backward(dy, cache)
    # dx = rstd * P(dy * gamma), P a projection onto a (M-2)-dim subspace per group. For small
    # groups P can nearly cancel dy by chance (n=1, g=1, cg=1, spatial=(3,), seed=0 gave
    # |dx| ~ 3e-4 with rstd ~ 6), so errors in dx are measured against its natural scale
    # max(rstd) * max|dy * gamma| as well: otherwise the O(h^2 rstd^3) truncation of the
    # differences, far below that scale, reads as a 2.5e-7 relative error.
    rstd = 1 / np.sqrt(x.reshape(n, g, -1).var(axis=2) + eps)  # (N, G)
    dx_scale = float(rstd.max() * np.abs(dy * gamma.reshape((1, -1) + (1,) * len(spatial))).max())
    # dbeta_c = sum_{n, s} dy and dgamma_c = sum_{n, s} dy * xhat can cancel to ~1e-2 of their terms
    # (n=2, g=1, cg=1, spatial=(2, 2), seed=1715: dbeta = 0.012 from 8 terms of size ~1), below the
    # differences' rounding floor eps * sum|dy y| / h = 2.7e-9, i.e. 2.2e-7 of dbeta: so they are
    # measured against the sum of their terms' magnitudes as well.
    over_ns = (0,) + tuple(range(2, x.ndim))
    xhat = groupnorm_forward(x, np.ones_like(gamma), np.zeros_like(beta), g, eps)[0]
    floors = {"x": dx_scale, "beta": float(np.abs(dy).sum(axis=over_ns).max()),
              "gamma": max(float(np.abs(dy * xhat).sum(axis=over_ns).max()), 1e-300)}  # xhat = 0: 1 per group
    _check_grads_floor(lambda x, gamma, beta: groupnorm_forward(x, gamma, beta, g, eps)[0],
                       {"x": x, "gamma": gamma, "beta": beta}, dy, {"beta": dbeta}, floors)
    # x and gamma are checked on y - beta (the same gradients): with a small gamma (-0.003 for
    # n=2, g=1, cg=1, spatial=(2, 2, 3), seed=4) the beta term dominated sum(dy * y) and its
    # rounding, eps * sum|dy y| / h = 3.9e-9, was 1.8e-7 of dx's natural scale
    beta_b = beta.reshape((1, -1) + (1,) * len(spatial))
    _check_grads_floor(lambda x, gamma, beta: groupnorm_forward(x, gamma, beta, g, eps)[0] - beta_b,
                       {"x": x, "gamma": gamma, "beta": beta}, dy, {"x": dx, "gamma": dgamma}, floors)


@needs("torch")
@given(**gn_shapes)
@example(n=1, g=1, cg=4, spatial=(3, 5), seed=0)
@example(n=2, g=4, cg=1, spatial=(1, 1), seed=1)
@example(n=2, g=3, cg=2, spatial=(), seed=2)
def test_groupnorm_matches_torch(n, g, cg, spatial, seed):
    torch = pytest.importorskip("torch")
    # PyTorch refuses a single value per (sample, group) with batch 1 ("Expected more than 1 value
    # per channel when training"); minidiff returns beta there (xhat = 0), tested by the gradcheck.
    assume(n * cg * int(np.prod(spatial)) > 1)
    x, gamma, beta = _gn_inputs(n, g, cg, spatial, seed)
    eps = 1e-3
    y, cache = groupnorm_forward(x, gamma, beta, g, eps)
    dy = np.random.default_rng(seed + 1).standard_normal(y.shape)
    dx, dgamma, dbeta = groupnorm_backward(dy, cache)

    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = torch.nn.functional.group_norm(xt, g, gt, bt, eps)
    yt.backward(torch.from_numpy(dy))
    # Errors are relative to max(|ours|, |torch|, natural scale |dy| |gamma|): for a group of one
    # element dx is exactly 0 here and ~1e-15 rounding noise in PyTorch (seed=1 example).
    scale = np.abs(dy).max() * max(np.abs(gamma).max(), 1.0)
    assert _rel_error_floor(y, yt.detach().numpy(), scale) < 1e-10
    assert _rel_error_floor(dx, xt.grad.numpy(), scale) < 1e-10
    assert _rel_error_floor(dgamma, gt.grad.numpy(), scale) < 1e-10
    assert _rel_error_floor(dbeta, bt.grad.numpy(), scale) < 1e-10


def test_groupnorm_hand_values_biased_variance():
    # groups {1, 2} and {3, 4}: mean 1.5 / 3.5, biased var 0.25, so xhat = -1, +1, -1, +1 (eps = 0);
    # the unbiased variance (0.5) would give +-0.7071
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    gamma = np.array([1.0, 2.0, 3.0, 4.0])
    beta = np.array([0.0, 10.0, 20.0, 30.0])
    y, _ = groupnorm_forward(x, gamma, beta, num_groups=2, eps=0.0)
    np.testing.assert_allclose(y, [[-1.0, 12.0, 17.0, 34.0]], rtol=0, atol=1e-12)
    # one group: mean 2.5, var 1.25
    y1, _ = groupnorm_forward(x, np.ones(4), np.zeros(4), num_groups=1, eps=0.0)
    np.testing.assert_allclose(y1[0], (x[0] - 2.5) / np.sqrt(1.25), rtol=0, atol=1e-12)
    # with gamma = 1, beta = 0 every group of the output has mean 0 and variance ~1
    xr, _, _ = _gn_inputs(2, 3, 2, (4, 5), seed=7)
    yr, _ = groupnorm_forward(xr, np.ones(6), np.zeros(6), 3)
    yg = yr.reshape(2, 3, -1)
    np.testing.assert_allclose(yg.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(yg.var(-1), 1, atol=1e-4)  # var/(var+eps) with eps = 1e-5


def test_groupnorm_float32_and_no_mutation():
    x, gamma, beta = _gn_inputs(2, 2, 3, (3, 4), seed=5, dtype=np.float32)
    y, cache = groupnorm_forward(x, gamma, beta, 2)
    assert y.dtype == np.float32
    dy = np.random.default_rng(6).standard_normal(y.shape).astype(np.float32)
    dy0, cache0 = dy.copy(), _snapshot(cache)
    grads = groupnorm_backward(dy, cache)
    assert all(a.dtype == np.float32 for a in grads)
    np.testing.assert_array_equal(dy, dy0)
    _assert_same(cache, cache0)
    # float32 agrees with float64 to float32 precision
    y64, c64 = groupnorm_forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), 2)
    assert rel_error(y, y64) < 1e-5
    for a, b in zip(grads, groupnorm_backward(dy.astype(np.float64), c64)):
        assert rel_error(a, b) < 1e-5


@pytest.mark.parametrize("seed", range(5))
def test_groupnorm_float32_large_mean(seed):
    # x = 30 + N(0, 1): float32 stays as close to float64 as x's rounding allows (~1e-6) only if
    # the sums of products use x - mean. Folding them as sum(dy * x) - mean * sum(dy) cancels:
    # dgamma errors of 3e-6 to 1.4e-5 on these seeds.
    rng = np.random.default_rng(seed)
    x = (30 + rng.standard_normal((4, 8, 16, 16))).astype(np.float32)
    gamma, beta = (1 + rng.standard_normal(8)).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    y, cache = groupnorm_forward(x, gamma, beta, 4)
    y64, c64 = groupnorm_forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), 4)
    assert rel_error(y, y64) < 3e-6
    for a, b in zip(groupnorm_backward(dy, cache), groupnorm_backward(dy.astype(np.float64), c64)):
        assert rel_error(a, b) < 3e-6


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_groups=4), "num_groups"),  # 4 does not divide C = 6
        (dict(num_groups=0), "num_groups"),
        (dict(num_groups=7), "num_groups"),
        (dict(num_groups=2.0), "num_groups"),
        (dict(num_groups=True), "num_groups"),
        (dict(x=np.ones((2, 6, 3), dtype=np.int64)), "x"),
        (dict(x=np.ones(6)), "x"),
        (dict(gamma=np.ones(5)), "gamma"),
        (dict(gamma=np.ones((6, 1))), "gamma"),
        (dict(beta=np.ones(7)), "beta"),
        (dict(gamma=np.ones(6, dtype=np.float32)), "gamma"),  # dtype differs from x: would upcast
        (dict(eps=-1.0), "eps"),
    ],
)
def test_groupnorm_bad_input(kwargs, name):
    args = dict(x=np.ones((2, 6, 3)), gamma=np.ones(6), beta=np.zeros(6), num_groups=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        groupnorm_forward(**args)


def test_groupnorm_backward_bad_dy():
    _, cache = groupnorm_forward(np.ones((2, 4, 3)), np.ones(4), np.zeros(4), 2)
    with pytest.raises(ValueError, match="dy"):
        groupnorm_backward(np.ones((2, 4, 2)), cache)



@given(**gn_shapes)
@example(n=1, g=1, cg=4, spatial=(3, 5), seed=0)  # one group, batch 1
@example(n=2, g=4, cg=1, spatial=(1, 1), seed=1)  # groups = channels, 1x1 spatial
def test_groupnorm_dx_has_no_component_along_a_shift(n, g, cg, spatial, seed):
    # y does not change when a group's inputs are all shifted by the same amount, so dx sums to 0 over
    # each (sample, group): the three-term formula's - mean_g(dxhat) term removes exactly that component
    x, gamma, beta = _gn_inputs(n, g, cg, spatial, seed)
    y, cache = groupnorm_forward(x, gamma, beta, g)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dx = groupnorm_backward(dy, cache)[0]
    scale = np.abs(dx).max() + np.abs(dy * gamma.reshape((1, -1) + (1,) * len(spatial))).max()
    assert np.abs(dx.reshape(n, g, -1).sum(axis=2)).max() < 1e-12 * scale * cg * max(1, int(np.prod(spatial)))


# ---------------------------------------------------------------- GPU parity (skips without CuPy + GPU)


@pytest.mark.gpu
def test_groupnorm_gpu_matches_cpu():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    x, gamma, beta = _gn_inputs(2, 3, 2, (5, 3), seed=11)
    dy = np.random.default_rng(12).standard_normal(x.shape)
    y, cache = groupnorm_forward(x, gamma, beta, 3)
    yg, cg = groupnorm_forward(*(to_device(a, "gpu") for a in (x, gamma, beta)), 3)
    assert rel_error(y, to_numpy(yg)) < 1e-12
    for a, b in zip(groupnorm_backward(dy, cache), groupnorm_backward(to_device(dy, "gpu"), cg)):
        assert rel_error(a, to_numpy(b)) < 1e-12
