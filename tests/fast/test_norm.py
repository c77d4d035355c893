"""fast/norm.py against nn/'s reference GroupNorm, SiLU and GroupNorm + SiLU, in float64.

Paths: NumPy runs the CPU fold (fast/cpu/groupnorm.py) for GroupNorm and SiLU with sigma(x) cached
(fast/cpu/activations.py);
CuPy runs the CUDA kernels (fast/cuda/groupnorm.py, fast/cuda/silu.py), here on the fake CuPy
(tests/fake_cupy.py: the kernels emulated from their bodies), and on a real GPU where there is one.

Tolerance: SiLU on NumPy is the reference's arithmetic with sigma(x) kept, bit for bit. GroupNorm is not: the fold does the
same algebra in another order (var as a BLAS dot product; y = (x - mean) (rstd gamma) + beta instead
of gamma ((x - mean) rstd) + beta; dx = dy a + (x - mean) k1 + k0 from per-channel sums instead of the
three group means; dgamma, dbeta summed per (n, c) first, then over n), so each output differs by
float64 rounding, a few ulp of the terms it is made of. TOL = 1e-13, relative to the larger of the two
results and of that output's natural scale, the size of the terms that sum to it:
    y       max |y|
    dx      max(rstd) max|dy| max(1, |gamma|)   (dx = rstd P(dy gamma), P a projection that can
            nearly cancel: exactly for a group of one element, where dx = 0 and each side holds noise)
    dgamma  max_c sum_{n, s} |dy xhat|          (the sum can cancel to far below its terms)
    dbeta   max_c sum_{n, s} |dy|
Measured over 3000 random shapes (0-2 spatial dims, group means 0 and 30; NumPy and the fake CuPy):
1.3e-15 at most (y of GroupNorm + SiLU), 8e-16 for GroupNorm alone, so TOL has
~80x margin, and an indexing bug (an O(1) error) cannot hide under it.
GroupNorm + SiLU on NumPy (issue 23) keeps y and s = sigma(h) and takes silu'(h) = s + y (1 - s) instead of
s (1 + h (1 - s)): y is the fold's GroupNorm then nn/'s SiLU bit for bit; against nn/ (3000 random shapes as
above, a throwaway script) 1.0e-15 (y), 4.5e-16 (dx), 4.6e-16 (dgamma), 3.4e-16 (dbeta), and
against the fold followed by nn/'s SiLU backward 3.7e-16 / 4.5e-16 / 3.3e-16: TOL again.
"""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fake_cupy
from gradcheck import rel_error
from minidiff.backend import gpu_available, is_cupy_array, to_device, to_numpy
from minidiff.fast import norm
from minidiff.fast.cpu import groupnorm as groupnorm_cpu
from minidiff.fast.ops import FAST
from minidiff.nn import activations, groupnorm, groupnorm_silu

TOL = 1e-13  # fold vs reference, float64: rounding only (see the module docstring)


def _inputs(n, g, cg, spatial, seed, offset=0.0):
    """x (N, C, *spatial) ~ 2 N(0, 1) + offset, gamma (C,) ~ 1 + N(0, 1) / 2, beta (C,) ~ N(0, 1), dy like x."""
    rng = np.random.default_rng(seed)
    c = g * cg
    x = 2 * rng.standard_normal((n, c) + tuple(spatial)) + offset
    return x, 1 + rng.standard_normal(c) / 2, rng.standard_normal(c), rng.standard_normal(x.shape)


def _scales(x, gamma, dy, g, eps=1e-5):
    """The natural scale of (y, dx, dgamma, dbeta) (see the module docstring); dy is the gradient of y."""
    xg = x.reshape(x.shape[0], g, -1)  # (N, G, M)
    rstd = 1 / np.sqrt(xg.var(axis=2) + eps)  # (N, G)
    xhat = ((xg - xg.mean(axis=2, keepdims=True)) * rstd[:, :, None]).reshape(x.shape)
    over_ns = (0,) + tuple(range(2, x.ndim))
    dx = rstd.max() * np.abs(dy).max() * max(1.0, np.abs(gamma).max())
    return (0.0, dx, float(np.abs(dy * xhat).sum(axis=over_ns).max()), float(np.abs(dy).sum(axis=over_ns).max()))


def _assert_close(got, want, scales, tol=TOL):
    for i, (a, b, s) in enumerate(zip(got, want, scales)):
        a, b = to_numpy(a), to_numpy(b)
        assert a.shape == b.shape and a.dtype == b.dtype, i
        err = np.abs(a - b).max(initial=0.0) / max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), s, 1e-300)
        assert err < tol, f"output {i}: relative error {err:.2e} >= {tol:.0e}"


shapes = dict(n=st.integers(1, 3), g=st.integers(1, 4), cg=st.integers(1, 3),
              spatial=st.lists(st.integers(1, 4), max_size=2).map(tuple), seed=st.integers(0, 2**16),
              offset=st.sampled_from([0.0, 30.0]))
edge_cases = [  # decorators: the same edge cases for every op
    example(n=1, g=1, cg=4, spatial=(3, 5), seed=0, offset=0.0),  # one group, batch 1
    example(n=2, g=4, cg=1, spatial=(1, 1), seed=1, offset=0.0),  # groups = channels, 1x1: one element per group
    example(n=2, g=3, cg=2, spatial=(), seed=2, offset=30.0),  # no spatial dims, large mean
    example(n=1, g=2, cg=3, spatial=(1, 1), seed=3, offset=30.0),  # 1x1 spatial, batch 1
]


def _with_edge_cases(test):
    for ex in reversed(edge_cases):
        test = ex(test)
    return test


def test_fast_table_holds_these_functions():
    for name in ("groupnorm_forward", "groupnorm_backward", "groupnorm_silu_forward", "groupnorm_silu_backward",
                 "silu_forward", "silu_backward"):
        assert getattr(FAST, name) is getattr(norm, name), name


# ---------------------------------------------------------------- NumPy: the CPU fold


@given(**shapes)
@_with_edge_cases
def test_groupnorm_matches_the_reference_on_numpy(n, g, cg, spatial, seed, offset):
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed, offset)
    y, cache = norm.groupnorm_forward(x, gamma, beta, g)
    y_ref, cache_ref = groupnorm.groupnorm_forward(x, gamma, beta, g)
    _assert_close((y, *norm.groupnorm_backward(dy, cache)), (y_ref, *groupnorm.groupnorm_backward(dy, cache_ref)),
                  _scales(x, gamma, dy, g))
    # the caches have the reference's layout: mean is the same NumPy mean, rstd differs by rounding
    assert len(cache) == len(cache_ref) and cache[0] is x and cache[1] is gamma and cache[4] == g
    np.testing.assert_array_equal(cache[2], cache_ref[2])
    assert rel_error(cache[3], cache_ref[3]) < TOL
    # dy_is_scratch (GroupNorm + SiLU's dh): dx written into dy's buffer, the same numbers bit for bit
    dx, dgamma, dbeta = norm.groupnorm_backward(dy, cache)
    scratch = dy.copy()
    for got, want in zip(groupnorm_cpu.groupnorm_backward(scratch, cache, dy_is_scratch=True), (dx, dgamma, dbeta)):
        np.testing.assert_array_equal(got, want)


@given(shape=st.lists(st.integers(1, 4), max_size=4).map(tuple), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([np.float64, np.float32]))
def test_silu_is_the_reference_on_numpy(shape, seed, dtype):
    """sigma(x) kept from the forward: the reference's operations in its order, so bit for bit."""
    rng = np.random.default_rng(seed)
    x = np.asarray(20 * rng.standard_normal(shape), dtype)
    dy = np.asarray(rng.standard_normal(shape), dtype)
    y, cache = norm.silu_forward(x)
    y_ref, cache_ref = activations.silu_forward(x)
    np.testing.assert_array_equal(y, y_ref)
    assert cache[0] is x and len(cache) == 2  # (x, sigma(x))
    dx_ref = activations.silu_backward(dy, cache_ref)
    dy_before = dy.copy()
    np.testing.assert_array_equal(norm.silu_backward(dy, cache), dx_ref)
    np.testing.assert_array_equal(norm.silu_backward(dy, cache_ref), dx_ref)  # the reference's cache works too
    np.testing.assert_array_equal(dy, dy_before)  # the upstream gradient is not written into


@given(**shapes)
@_with_edge_cases
def test_groupnorm_silu_matches_the_reference_on_numpy(n, g, cg, spatial, seed, offset):
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed, offset)
    y, cache = norm.groupnorm_silu_forward(x, gamma, beta, g)
    y_ref, cache_ref = groupnorm_silu.groupnorm_silu_forward(x, gamma, beta, g)
    # dh = silu'(h) dy takes dy's place in the scales; |silu'| < 1.1, so dy's scales with a 1.1 margin
    scales = [1.1 * s for s in _scales(x, gamma, dy, g)]
    dy_before = dy.copy()
    got = (y, *norm.groupnorm_silu_backward(dy, cache))
    np.testing.assert_array_equal(dy, dy_before)  # dh is the backward's own buffer, never dy
    assert not np.shares_memory(got[1], dy) and not np.shares_memory(got[1], y)
    _assert_close(got, (y_ref, *groupnorm_silu.groupnorm_silu_backward(dy, cache_ref)), scales)
    # y is the fold's GroupNorm followed by nn/'s SiLU, bit for bit; the backward within rounding of that pair's
    h, norm_cache = groupnorm_cpu.groupnorm_forward(x, gamma, beta, g)
    y_pair, act = activations.silu_forward(h)
    np.testing.assert_array_equal(y, y_pair)
    _assert_close(got[1:], groupnorm_cpu.groupnorm_backward(activations.silu_backward(dy, act), norm_cache),
                  scales[1:])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_groupnorm_silu_saturates_as_the_reference(dtype):
    """h far below -88 (float32) / -709 (float64): exp(-h) overflows to inf, sigma(h) to 0, silently, as in nn/;
    y equals the fold followed by nn/'s SiLU bit for bit, and the gradient through a saturated SiLU is 0."""
    x, gamma, beta, dy = _inputs(2, 2, 3, (4, 4), seed=5)
    x, gamma, beta, dy = (a.astype(dtype) for a in (x, gamma, beta, dy))
    gamma = (gamma * 500).astype(dtype)  # |h| up to ~1500
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no warning escapes (underflow: NumPy ignores)
        y, cache = norm.groupnorm_silu_forward(x, gamma, beta, 2)
        dx, dgamma, dbeta = norm.groupnorm_silu_backward(dy, cache)
    h, norm_cache = groupnorm_cpu.groupnorm_forward(x, gamma, beta, 2)
    with np.errstate(over="ignore"):
        y_pair, act = activations.silu_forward(h)
    np.testing.assert_array_equal(y, y_pair)
    assert (h < -800).any() and (y[h < -800] == 0).all()
    want = groupnorm_cpu.groupnorm_backward(activations.silu_backward(dy, act), norm_cache)
    for got, w in zip((dx, dgamma, dbeta), want):
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, w, rtol=1e-5 if dtype == np.float32 else 1e-12,
                                   atol=1e-6 * np.abs(w).max())


def test_fast_ops_name_the_bad_argument():
    x, gamma, beta, dy = _inputs(2, 2, 2, (3, 3), seed=3)
    with pytest.raises(ValueError, match="num_groups"):
        norm.groupnorm_forward(x, gamma, beta, 3)
    with pytest.raises(ValueError, match="gamma"):
        norm.groupnorm_silu_forward(x, gamma[:3], beta, 2)
    with pytest.raises(ValueError, match="x"):
        norm.silu_forward(np.arange(4))
    for forward, backward in ((norm.groupnorm_forward, norm.groupnorm_backward),
                              (norm.groupnorm_silu_forward, norm.groupnorm_silu_backward)):
        _, cache = forward(x, gamma, beta, 2)
        with pytest.raises(ValueError, match="dy"):
            backward(np.ones((2, 4, 3)), cache)


# ---------------------------------------------------------------- CuPy: the kernels, on the fake CuPy


def _on_fake(fn, *arrays):
    """fn(*arrays) with the arrays on the fake CuPy, and the names of the kernels it called."""
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        out = fn(*(fake.asarray(a) if isinstance(a, np.ndarray) else a for a in arrays))
        return out, list(fake.kernels_called)


@given(**shapes)
@_with_edge_cases
def test_groupnorm_kernels_match_the_reference(n, g, cg, spatial, seed, offset):
    """The Python around the kernels (reshapes, broadcasts, which kernel gets which array), float64."""
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed, offset)

    def run(x, gamma, beta, dy):
        y, cache = norm.groupnorm_forward(x, gamma, beta, g)
        return (y, *norm.groupnorm_backward(dy, cache))
    got, kernels = _on_fake(run, x, gamma, beta, dy)
    assert all(is_cupy_array(a) for a in got)
    assert {"minidiff_gn_stats_double", "minidiff_gn_apply", "minidiff_gn_backward_apply"} <= set(kernels)
    y_ref, cache_ref = groupnorm.groupnorm_forward(x, gamma, beta, g)
    _assert_close(got, (y_ref, *groupnorm.groupnorm_backward(dy, cache_ref)), _scales(x, gamma, dy, g))


@given(shape=st.lists(st.integers(1, 4), max_size=4).map(tuple), seed=st.integers(0, 2**16))
def test_silu_kernels_match_the_reference(shape, seed):
    """The fake runs each kernel's body, the reference's operations in the reference's order: bit for bit."""
    x = np.asarray(20 * np.random.default_rng(seed).standard_normal(shape))
    dy = np.asarray(np.random.default_rng(seed + 1).standard_normal(shape))

    def run(x, dy):
        y, cache = norm.silu_forward(x)
        return y, norm.silu_backward(dy, cache)
    (y, dx), kernels = _on_fake(run, x, dy)
    assert kernels == ["minidiff_silu_forward", "minidiff_silu_backward"]
    y_ref, cache_ref = activations.silu_forward(x)
    np.testing.assert_array_equal(to_numpy(y), y_ref)
    np.testing.assert_array_equal(to_numpy(dx), activations.silu_backward(dy, cache_ref))


@given(n=st.integers(1, 3), g=st.integers(1, 3), cg=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), max_size=2).map(tuple), seed=st.integers(0, 2**16),
       offset=st.sampled_from([0.0, 30.0]))
@example(n=1, g=1, cg=1, spatial=(1, 1), seed=0, offset=0.0)  # one element per group: h = beta
@example(n=2, g=3, cg=1, spatial=(), seed=1, offset=30.0)  # groups = channels, no spatial dims, large mean
@example(n=2, g=2, cg=2, spatial=(), seed=0, offset=0.0)  # found: two per group, dx cancels (see scale)
def test_fused_gpu_path_on_the_fake_cupy_matches_numpy(n, g, cg, spatial, seed, offset):
    """The fused path (fast/cuda/groupnorm.py, silu=True), its kernels emulated by name: the Python around them
    (reshapes, broadcasts, which kernel gets which array) against the NumPy composition, float64.
    (Moved from tests/test_nn_groupnorm_silu.py: "NumPy" is FAST's NumPy path, the same folded formulas as
    the kernels; the reference, in another order, is checked with TOL below.)"""
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed, offset)
    y, cache = norm.groupnorm_silu_forward(x, gamma, beta, g)
    want = (y, *norm.groupnorm_silu_backward(dy, cache))
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        y_d, cache_d = norm.groupnorm_silu_forward(*(fake.asarray(a) for a in (x, gamma, beta)), g)
        assert cache_d[1] is None  # fused: no SiLU cache, h is not kept
        got = (y_d, *norm.groupnorm_silu_backward(fake.asarray(dy), cache_d))
        assert {"minidiff_gn_apply_silu", "minidiff_gn_silu_backward_apply"} <= set(fake.kernels_called)
    # errors against max(|want|, dx's natural scale rstd |dy| |gamma|): with M = 2 elements per group
    # xhat is +-1 almost exactly and dx cancels to O(eps) (found: n=2, g=2, cg=2, spatial=(), seed=0)
    rstd = 1 / np.sqrt(x.reshape(n, g, -1).var(axis=2) + 1e-5)
    scale = rstd.max() * np.abs(dy).max() * max(1.0, np.abs(gamma).max())
    for w, d in zip(want, got):
        assert is_cupy_array(d) and d.shape == w.shape
        assert np.abs(to_numpy(d) - w).max() / max(np.abs(w).max(), scale) < 1e-12
    y_ref, cache_ref = groupnorm_silu.groupnorm_silu_forward(x, gamma, beta, g)
    _assert_close(got, (y_ref, *groupnorm_silu.groupnorm_silu_backward(dy, cache_ref)),
                  [1.1 * s for s in _scales(x, gamma, dy, g)])


def test_kernel_launches_per_op():
    """Device operations per call on the fake (about one kernel launch each on CuPy), as before the kernels
    moved to fast/: GroupNorm 2 forward and 8 backward, SiLU 1 and 1, GroupNorm + SiLU 2 and 8; no
    host -> device copies. The reference ops on CuPy take 12, 15, 5, 9, 17 and 24."""
    x, gamma, beta, dy = _inputs(2, 3, 2, (4, 5), seed=0)
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        xd, gd, bd, dyd = (fake.asarray(a) for a in (x, gamma, beta, dy))
        norm.groupnorm_forward(xd, gd, bd, 3), norm.groupnorm_silu_forward(xd, gd, bd, 3), norm.silu_forward(xd)
        out = {}
        for name, forward, backward, args in (
                ("groupnorm", norm.groupnorm_forward, norm.groupnorm_backward, (xd, gd, bd, 3)),
                ("silu", norm.silu_forward, norm.silu_backward, (xd,)),
                ("groupnorm_silu", norm.groupnorm_silu_forward, norm.groupnorm_silu_backward, (xd, gd, bd, 3)),
                ("reference groupnorm", groupnorm.groupnorm_forward, groupnorm.groupnorm_backward, (xd, gd, bd, 3)),
                ("reference silu", activations.silu_forward, activations.silu_backward, (xd,)),
                ("reference groupnorm_silu", groupnorm_silu.groupnorm_silu_forward,
                 groupnorm_silu.groupnorm_silu_backward, (xd, gd, bd, 3))):
            kept = []
            fwd = fake_cupy.count(lambda: kept.append(forward(*args)[1]))
            bwd = fake_cupy.count(lambda: backward(dyd, kept[0]))
            out[name] = (fwd["ops"], bwd["ops"], fwd["h2d"] + bwd["h2d"])
    assert out == {"groupnorm": (2, 8, 0), "silu": (1, 1, 0), "groupnorm_silu": (2, 8, 0),
                   "reference groupnorm": (12, 15, 0), "reference silu": (5, 9, 0),
                   "reference groupnorm_silu": (17, 24, 0)}


# ---------------------------------------------------------------- a real GPU (skips without CuPy + GPU)


@pytest.mark.gpu
def test_fast_ops_on_the_gpu_match_the_reference():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    x, gamma, beta, dy = _inputs(2, 3, 2, (5, 3), seed=11, offset=30.0)
    scales = _scales(x, gamma, dy, 3)
    for fast_pair, ref_pair in (((norm.groupnorm_forward, norm.groupnorm_backward),
                                 (groupnorm.groupnorm_forward, groupnorm.groupnorm_backward)),
                                ((norm.groupnorm_silu_forward, norm.groupnorm_silu_backward),
                                 (groupnorm_silu.groupnorm_silu_forward, groupnorm_silu.groupnorm_silu_backward))):
        y, cache = fast_pair[0](*(to_device(a, "gpu") for a in (x, gamma, beta)), 3)
        got = (y, *fast_pair[1](to_device(dy, "gpu"), cache))
        y_ref, cache_ref = ref_pair[0](x, gamma, beta, 3)
        # cuBLAS/CUB reduce in another order than NumPy, and CUDA's exp is not NumPy's: 1e-12
        _assert_close(got, (y_ref, *ref_pair[1](dy, cache_ref)), [1.1 * s for s in scales], tol=1e-12)
    y, cache = norm.silu_forward(to_device(4 * x, "gpu"))
    y_ref, cache_ref = activations.silu_forward(4 * x)
    assert rel_error(y, y_ref) < 1e-12
    assert rel_error(norm.silu_backward(to_device(dy, "gpu"), cache), activations.silu_backward(dy, cache_ref)) < 1e-12
