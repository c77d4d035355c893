"""silu(GroupNorm(x)) as one op (nn/groupnorm_silu.py): finite differences in float64, PyTorch autograd,
and that it is the two ops in turn. Its fused GPU path (fast/norm.py) is checked in tests/fast/test_norm.py."""

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from gradcheck import check_grads, needs, rel_error
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


gn_silu_shapes = dict(n=st.integers(1, 3), g=st.integers(1, 3), cg=st.integers(1, 3),
                      spatial=st.lists(st.integers(1, 4), max_size=2).map(tuple), seed=st.integers(0, 2**16))


@given(**gn_silu_shapes)
@example(n=1, g=1, cg=3, spatial=(2, 3), seed=0)  # one group, batch 1
@example(n=2, g=3, cg=1, spatial=(3, 1), seed=1)  # groups = channels
@example(n=2, g=2, cg=3, spatial=(1, 1), seed=2)  # 1x1 spatial
@example(n=1, g=1, cg=1, spatial=(1, 1), seed=3)  # one element per group: h = beta, dx = 0
def test_is_the_two_ops_in_turn_any_shape(n, g, cg, spatial, seed):
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed)
    h, norm = groupnorm_forward(x, gamma, beta, g)
    y_want, act = silu_forward(h)
    y, cache = groupnorm_silu_forward(x, gamma, beta, g)
    np.testing.assert_array_equal(y, y_want)
    for got, want in zip(groupnorm_silu_backward(dy, cache), groupnorm_backward(silu_backward(dy, act), norm)):
        np.testing.assert_array_equal(got, want)


@needs("torch")
@given(**gn_silu_shapes)
@example(n=1, g=1, cg=3, spatial=(2, 3), seed=0)  # one group, batch 1
@example(n=2, g=3, cg=1, spatial=(3, 1), seed=1)  # groups = channels
@example(n=2, g=2, cg=3, spatial=(1, 1), seed=2)  # 1x1 spatial
def test_matches_torch_any_shape(n, g, cg, spatial, seed):
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = _inputs(n, g, cg, spatial, seed)
    assume(n * cg * int(np.prod(spatial)) > 1)  # PyTorch refuses one value per (sample, group) at batch 1
    eps = 1e-3
    y, cache = groupnorm_silu_forward(x, gamma, beta, g, eps)
    xt, gt, bt = (torch.tensor(a, requires_grad=True) for a in (x, gamma, beta))
    yt = torch.nn.functional.silu(torch.nn.functional.group_norm(xt, g, gt, bt, eps))
    yt.backward(torch.from_numpy(dy))
    # errors against max(|ours|, |torch|, the natural scale |dy| |gamma| rstd): with one element per
    # (sample, group) dx is 0 and both sides hold rounding noise
    rstd = 1 / np.sqrt(x.reshape(n, g, -1).var(axis=2) + eps)
    scale = np.abs(dy).max() * max(np.abs(gamma).max(), 1.0) * rstd.max()
    for got, want in zip((y, *groupnorm_silu_backward(dy, cache)), (yt, xt.grad, gt.grad, bt.grad)):
        want = want.detach().numpy()
        assert np.abs(got - want).max() / max(np.abs(got).max(), np.abs(want).max(), scale) < 1e-10
