"""silu(GroupNorm(x)) as one op (nn/groupnorm_silu.py): finite differences in float64, PyTorch autograd,
the two ops in turn, and its fused GPU path run on the fake CuPy (tests/fake_cupy.py) against NumPy."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fake_cupy
from gradcheck import check_grads, rel_error
from minidiff import backend
from minidiff.backend import is_cupy_array, to_numpy
from minidiff.nn import (
    groupnorm_backward, groupnorm_forward, groupnorm_silu_backward, groupnorm_silu_forward, silu_backward, silu_forward,
)


def _inputs(n, g, cg, spatial, seed, offset=0.0):
    """x (N, C, *spatial) ~ 2 N(0, 1) + offset, gamma (C,) ~ 1 + N(0, 1) / 2, beta (C,) ~ N(0, 1), dy like x."""
    rng = np.random.default_rng(seed)
    c = g * cg
    x = 2 * rng.standard_normal((n, c) + tuple(spatial)) + offset
    return x, 1 + rng.standard_normal(c) / 2, rng.standard_normal(c), rng.standard_normal(x.shape)


CASES = [  # (n, g, cg, spatial): the shapes of the U-Net's norms and the edge cases
    (2, 2, 3, (4, 5)),
    (1, 1, 4, (3, 3)),  # one group, batch 1
    (2, 3, 1, (2, 2)),  # groups = channels
    (2, 2, 3, (1, 1)),  # 1x1 spatial (3 per group: with 2, xhat = +-1 nearly, and dx = O(eps) is below the differences)
    (3, 2, 3, ()),  # no spatial dims
]


@pytest.mark.parametrize("n,g,cg,spatial", CASES)
def test_gradcheck(n, g, cg, spatial):
    x, gamma, beta, _ = _inputs(n, g, cg, spatial, seed=n + 10 * g + 100 * cg)
    y, cache = groupnorm_silu_forward(x, gamma, beta, g, 1e-5)

    def grads(dy):
        dx, dgamma, dbeta = groupnorm_silu_backward(dy, cache)
        return {"x": dx, "gamma": dgamma, "beta": dbeta}
    check_grads(lambda x, gamma, beta: groupnorm_silu_forward(x, gamma, beta, g, 1e-5)[0],
                {"x": x, "gamma": gamma, "beta": beta}, grads)


def test_is_the_two_ops_in_turn_on_numpy():
    x, gamma, beta, dy = _inputs(2, 4, 2, (3, 5), seed=1)
    h, norm = groupnorm_forward(x, gamma, beta, 4)
    y_want, act = silu_forward(h)
    y, cache = groupnorm_silu_forward(x, gamma, beta, 4)
    np.testing.assert_array_equal(y, y_want)
    for got, want in zip(groupnorm_silu_backward(dy, cache), groupnorm_backward(silu_backward(dy, act), norm)):
        np.testing.assert_array_equal(got, want)


def test_matches_torch():
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = _inputs(2, 3, 2, (4, 3), seed=2)
    y, cache = groupnorm_silu_forward(x, gamma, beta, 3, 1e-5)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = torch.nn.functional.silu(torch.nn.functional.group_norm(xt, 3, gt, bt, 1e-5))
    yt.backward(torch.from_numpy(dy))
    assert rel_error(y, yt.detach().numpy()) < 1e-12
    for got, t in zip(groupnorm_silu_backward(dy, cache), (xt, gt, bt)):
        assert rel_error(got, t.grad.numpy()) < 1e-12


def test_bad_input_names_the_argument():
    x, gamma, beta, _ = _inputs(2, 2, 2, (3, 3), seed=3)
    with pytest.raises(ValueError, match="num_groups"):
        groupnorm_silu_forward(x, gamma, beta, 3)
    with pytest.raises(ValueError, match="gamma"):
        groupnorm_silu_forward(x, gamma[:3], beta, 2)
    _, cache = groupnorm_silu_forward(x, gamma, beta, 2)
    with pytest.raises(ValueError, match="dy"):
        groupnorm_silu_backward(np.ones((2, 4, 3)), cache)


@given(n=st.integers(1, 3), g=st.integers(1, 3), cg=st.integers(1, 3),
       spatial=st.lists(st.integers(1, 4), max_size=2).map(tuple), seed=st.integers(0, 2**16),
       offset=st.sampled_from([0.0, 30.0]))
@example(n=1, g=1, cg=1, spatial=(1, 1), seed=0, offset=0.0)  # one element per group: h = beta
@example(n=2, g=3, cg=1, spatial=(), seed=1, offset=30.0)  # groups = channels, no spatial dims, large mean
@example(n=2, g=2, cg=2, spatial=(), seed=0, offset=0.0)  # found: two per group, dx cancels (see scale)
def test_fused_gpu_path_on_the_fake_cupy_matches_numpy(n, g, cg, spatial, seed, offset):
    """The fused path (groupnorm_cuda.py, silu=True), its kernels emulated by name: the Python around them
    (reshapes, broadcasts, which kernel gets which array) against the NumPy composition, float64."""
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed, offset)
    y, cache = groupnorm_silu_forward(x, gamma, beta, g)
    want = (y, *groupnorm_silu_backward(dy, cache))
    with pytest.MonkeyPatch.context() as mp:
        fake = fake_cupy.install(mp)
        mp.setattr(backend, "FUSED", True)
        y_d, cache_d = groupnorm_silu_forward(*(fake.asarray(a) for a in (x, gamma, beta)), g)
        assert cache_d[1] is None  # fused: no SiLU cache, h is not kept
        got = (y_d, *groupnorm_silu_backward(fake.asarray(dy), cache_d))
        assert {"minidiff_gn_apply_silu", "minidiff_gn_silu_backward_apply"} <= set(fake.kernels_called)
    # errors against max(|want|, dx's natural scale rstd |dy| |gamma|): with M = 2 elements per group
    # xhat is +-1 almost exactly and dx cancels to O(eps) (found: n=2, g=2, cg=2, spatial=(), seed=0)
    rstd = 1 / np.sqrt(x.reshape(n, g, -1).var(axis=2) + 1e-5)
    scale = rstd.max() * np.abs(dy).max() * max(1.0, np.abs(gamma).max())
    for w, d in zip(want, got):
        assert is_cupy_array(d) and d.shape == w.shape
        assert np.abs(to_numpy(d) - w).max() / max(np.abs(w).max(), scale) < 1e-12
