"""GroupNorm on NumPy in fewer whole-array passes: nn/groupnorm.py's formulas, folded.

NumPy is memory-bound here, so both passes fold everything per group or per channel into small
(N, G) and (N, C) coefficients and touch the activation-sized arrays only in a few whole-array
ops, written in place, with no product temporaries (_dot_last):

    forward   y = (x - mean_g) a_c + beta_c,   a_c = rstd_g gamma_c              (N, C) scale
    backward  dx = dy a_c + (x - mean_g) k1_g + k0_g                            (N, G) k1, k0

Sums of products use x - mean, never x itself: with a large group mean, E[x^2] - E[x]^2 or
sum(dy * x) - mean * sum(dy) would cancel in float32 (tests/nn/test_groupnorm.py::
test_groupnorm_float32_large_mean). The caches are nn/groupnorm.py's, so either backward takes
either forward's cache. The numbers differ from the reference by rounding only (the sums are
grouped differently): tests/fast/test_norm.py.

Shape legend: N batch, C channels, *S any number of spatial dims, G groups, Cg = C / G,
L = prod(S), M = Cg * L.
"""

from __future__ import annotations

from ...backend import get_array_module
from ...nn._check import check_shape
from ...nn.groupnorm import check_groupnorm_args


def _dot_last(u, v):
    """sum_k u[..., k] * v[..., k]   (..., K), (..., K) -> (...)

    A batched matmul of (..., 1, K) by (..., K, 1): BLAS dot products on NumPy, with no (..., K)
    temporary. Faster than np.einsum("...k,...k->...") and, in float32, as accurate as NumPy's
    pairwise sum (einsum accumulates serially: ~7x the error at K = 8192).
    """
    return (u[..., None, :] @ v[..., :, None])[..., 0, 0]


def groupnorm_forward(x, gamma, beta, num_groups, eps=1e-5):
    """nn.groupnorm.groupnorm_forward, as y = (x - mean_g) a_c + beta_c with a_c = rstd_g gamma_c, in place."""
    g = check_groupnorm_args(x, gamma, beta, num_groups, eps)
    n, c = x.shape[:2]
    xp = get_array_module(x)
    xg = x.reshape(n, g, -1)  # (N, G, M)
    mean = xg.mean(axis=2)  # (N, G)
    y = xg - mean[:, :, None]  # (N, G, M) centered x, in the buffer that becomes y
    var = _dot_last(y, y) / y.shape[2]  # (N, G) biased, as PyTorch; two-pass
    rstd = 1.0 / xp.sqrt(var + float(eps))  # (N, G)
    # y = (x - mean) * rstd * gamma + beta = (x - mean) * a + beta, a the folded scale
    a = (rstd[:, :, None] * gamma.reshape(g, -1)).reshape(n, c, 1)  # (N, C, 1)
    y3 = y.reshape(n, c, -1)  # (N, C, L) a view of y
    y3 *= a
    y3 += beta.reshape(1, c, 1)
    return y.reshape(x.shape), (x, gamma, mean, rstd, g)  # nn/groupnorm.py's cache


def groupnorm_backward(dy, cache, dy_is_scratch=False):
    """nn.groupnorm.groupnorm_backward, from two sums per (sample, channel) (dy_is_scratch: dx overwrites dy,
    for a caller whose dy is its own temporary, fast/cpu/activations.py's dh):

    s1 = sum_S dy and s2 = sum_S dy * (x - mean). With xhat = (x - mean) * rstd, the group sums of
    the three-term formula are
        sum_g dxhat        = sum_{c in g} gamma_c s1 =: A1             (N, G)
        sum_g dxhat * xhat = rstd * sum_{c in g} gamma_c s2 =: rstd A2  (N, G)
    so that, expanding the bracket,
        dx = dy * (rstd gamma_c) + (x - mean) * (-rstd^3 A2 / M) + (-rstd A1 / M)
           = dy * a + (x - mean) * k1 + k0,   a (N, C) as in the forward, k1, k0 (N, G),
        dgamma_c = sum_N rstd s2,   dbeta_c = sum_N s1.
    """
    x, gamma, mean, rstd, g = cache
    check_shape("dy", dy, x.shape, "(N, C, *spatial)")
    xp = get_array_module(dy, x)
    n, c = x.shape[:2]
    xc = x.reshape(n, g, -1) - mean[:, :, None]  # (N, G, M) recomputed, as in the forward
    m = xc.shape[2]
    xc3 = xc.reshape(n, c, -1)  # (N, C, L) a view of xc
    dy3 = dy.reshape(n, c, -1)  # (N, C, L)
    s1 = dy3.sum(axis=2)  # (N, C) sum_S dy
    s2 = _dot_last(dy3, xc3)  # (N, C) sum_S dy * (x - mean)
    rstd_c = xp.repeat(rstd, c // g, axis=1)  # (N, C) rstd of each channel's group
    dbeta = s1.sum(axis=0)  # (C,)
    dgamma = (s2 * rstd_c).sum(axis=0)  # (C,) sum_{N, S} dy * (x - mean) * rstd
    a1 = (s1 * gamma).reshape(n, g, -1).sum(axis=2)  # (N, G) sum_g dxhat
    a2 = (s2 * gamma).reshape(n, g, -1).sum(axis=2)  # (N, G) sum_g dxhat * (x - mean)
    k1 = -(rstd * rstd * rstd) * a2 / m  # (N, G)
    k0 = -rstd * a1 / m  # (N, G)
    xc *= k1[:, :, None]
    xc += k0[:, :, None]  # (N, G, M) now (x - mean) * k1 + k0
    a = (rstd_c * gamma)[:, :, None]  # (N, C, 1) a = rstd * gamma, the forward's scale
    if dy_is_scratch:
        dx = dy3  # (N, C, L) dy's buffer, dead after this
        dx *= a
    else:
        dx = dy3 * a  # (N, C, L) dy * a
    dx += xc3
    return dx.reshape(x.shape), dgamma, dbeta
