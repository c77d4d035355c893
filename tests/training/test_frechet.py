"""frechet_distance against closed forms, itself, and scipy's sqrtm."""

import numpy as np
import pytest

from minidiff.training.frechet import feature_stats, frechet_distance, sqrtm_psd


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_diagonal_closed_form():
    # diagonal S1, S2: d^2 = ||mu1 - mu2||^2 + sum_i (sqrt a_i - sqrt b_i)^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
    want = 1.0 + 9.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-12)


def test_rotated_and_scaled_closed_form():
    # S2 = c S1 with a full (non-diagonal) S1: d^2 = (1 - sqrt c)^2 Tr S1; any rotation Q leaves d^2 unchanged
    rng = np.random.default_rng(0)
    s1, c = _spd(rng, 5), 2.5
    mu = rng.standard_normal(5)
    assert frechet_distance(mu, s1, mu, c * s1) == pytest.approx((1 - np.sqrt(c)) ** 2 * np.trace(s1), rel=1e-10)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    s2 = _spd(rng, 5)
    d = frechet_distance(mu, s1, mu + 1, s2)
    assert frechet_distance(q @ mu, q @ s1 @ q.T, q @ (mu + 1), q @ s2 @ q.T) == pytest.approx(d, rel=1e-10)


def test_same_set_is_zero_and_symmetric():
    rng = np.random.default_rng(1)
    f, g = rng.standard_normal((50, 8)), rng.standard_normal((40, 8)) + 0.5
    mu, s = feature_stats(f)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-10
    mu2, s2 = feature_stats(g)
    assert frechet_distance(mu, s, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu, s), rel=1e-9)
    # singular covariances (fewer samples than dimensions) stay finite and ~0 against themselves: the zero
    # eigenvalues come out as +-1e-16, whose square roots are 1e-8 (measured 2e-8 here, Tr S = 3.4)
    mu3, s3 = feature_stats(rng.standard_normal((4, 8)))
    assert abs(frechet_distance(mu3, s3, mu3, s3)) < 1e-7 * np.trace(s3)


def test_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 6), _spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)
    np.testing.assert_allclose(sqrtm_psd(s1) @ sqrtm_psd(s1), s1, rtol=1e-10, atol=1e-12)


def test_bad_shapes_one_line():
    with pytest.raises(ValueError, match="mu"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))
