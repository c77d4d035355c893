"""Schedules, the forward process q(x_t | x_0) and the prediction-type conversions.

Hand values are written from the formulas with literal numbers; diffusers (where installed)
is the reference for every option name and value.
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minidiff.diffusion import schedule as S

SCHEDULES = list(S.BETA_SCHEDULES)
schedule_args = st.tuples(st.sampled_from(SCHEDULES), st.integers(2, 1000), st.booleans())


def build(name, T, rescale):
    return S.make_schedule(T, name, beta_start=1e-4 if name != "scaled_linear" else 8.5e-4,
                           beta_end=0.02 if name != "scaled_linear" else 0.012, rescale_betas_zero_snr=rescale)


# ----------------------------------------------------------------------------- hand values


def test_linear_hand_values():
    s = S.make_schedule()
    assert s.betas.dtype == np.float64 and s.betas.shape == (1000,)
    np.testing.assert_allclose(s.betas[[0, 1, 999]], [1e-4, 1e-4 + (0.02 - 1e-4) / 999, 0.02], rtol=1e-14)
    np.testing.assert_allclose(s.alphas_cumprod[1], (1 - 1e-4) * (1 - 1e-4 - 0.0199 / 999), rtol=1e-14)
    assert s.alphas_cumprod_prev[0] == 1.0 and s.alphas_cumprod_prev[5] == s.alphas_cumprod[4]


def test_scaled_linear_cosine_sigmoid_hand_values():
    s = S.make_schedule(1000, "scaled_linear", 0.00085, 0.012)
    b1 = (0.00085**0.5 + (0.012**0.5 - 0.00085**0.5) / 999) ** 2
    np.testing.assert_allclose(s.betas[[0, 1, 999]], [0.00085, b1, 0.012], rtol=1e-13)
    c = S.make_schedule(1000, "squaredcos_cap_v2")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(c.betas[[0, 500]], [1 - f(0.001) / f(0.0), 1 - f(0.501) / f(0.5)], rtol=1e-13)
    assert c.betas[-1] == 0.999  # 1 - f(1)/f(0.999) ~ 1 is capped at max_beta
    g = S.make_schedule(1000, "sigmoid", 1e-4, 0.02)
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    np.testing.assert_allclose(g.betas[[0, 999]], [sig(-6) * 0.0199 + 1e-4, sig(6) * 0.0199 + 1e-4], rtol=1e-13)


def test_derived_coefficients_hand_values():
    s = S.make_schedule(10, "linear", 0.1, 0.5)
    b = np.linspace(0.1, 0.5, 10)
    ab = np.cumprod(1 - b)
    t = 3
    np.testing.assert_allclose(s.posterior_variance[t], b[t] * (1 - ab[t - 1]) / (1 - ab[t]), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_mean_coef1[t], b[t] * ab[t - 1] ** 0.5 / (1 - ab[t]), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_mean_coef2[t], (1 - ab[t - 1]) * (1 - b[t]) ** 0.5 / (1 - ab[t]), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_log_variance_clipped[0], np.log(s.posterior_variance[1]), rtol=1e-14)
    np.testing.assert_allclose(s.snr[t], ab[t] / (1 - ab[t]), rtol=1e-14)
    np.testing.assert_allclose(s.sqrt_recipm1_alphas_cumprod[t], (1 / ab[t] - 1) ** 0.5, rtol=1e-14)


# ----------------------------------------------------------------------------- invariants


@given(schedule_args)
@example(("squaredcos_cap_v2", 1000, True))
@example(("linear", 2, True))
def test_schedule_invariants(args):
    s = build(*args)
    assert np.all(s.betas > 0) and np.all(s.betas <= 1)
    assert np.all(np.diff(s.alphas_cumprod) < 0)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - s.betas), rtol=1e-12)
    # law of total expectation / variance for q(x_{t-1} | x_t, x_0), t >= 1:
    # sqrt(abar_{t-1}) = coef1 + coef2 sqrt(abar_t);  1 - abar_{t-1} = coef2^2 (1 - abar_t) + beta~_t
    ab, abp = s.alphas_cumprod[1:], s.alphas_cumprod_prev[1:]
    np.testing.assert_allclose(s.posterior_mean_coef1[1:] + s.posterior_mean_coef2[1:] * ab**0.5, abp**0.5, atol=1e-12)
    np.testing.assert_allclose(s.posterior_mean_coef2[1:] ** 2 * (1 - ab) + s.posterior_variance[1:], 1 - abp, atol=1e-12)
    if args[2]:  # zero terminal SNR: abar_{T-1} = 0 exactly, sqrt(abar_0) unchanged
        assert s.alphas_cumprod[-1] == 0 and s.snr[-1] == 0
        np.testing.assert_allclose(s.alphas_cumprod[0], build(args[0], args[1], False).alphas_cumprod[0], rtol=1e-12)


def test_schedule_is_frozen_and_read_only():
    s = S.make_schedule(10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.betas = np.ones(10)
    with pytest.raises(ValueError):
        s.alphas_cumprod[0] = 0.5
    assert len(s) == 10


def test_trained_betas_override():
    b = np.linspace(0.01, 0.2, 7)
    s = S.make_schedule(7, "linear", trained_betas=b)
    np.testing.assert_array_equal(s.betas, b)
    assert s.beta_schedule == "trained"


# ----------------------------------------------------------------------------- forward process


@settings(max_examples=10)
@given(schedule_args, st.integers(0, 10**6), st.sampled_from([np.float32, np.float64]))
def test_add_noise_equals_composed_forward_steps_in_moments(args, seed, dtype):
    """Both maps are linear in (x_0, noise): x_t = c x_0 + sum_k d_k z_k. One batch row with
    x_0 = 1 and zero noise gives c, and row k + 1 with x_0 = 0 and z_k = 1 gives d_k, so the moments
    of t + 1 composed forward_steps are computed exactly: c = sqrt(abar_t), sum_k d_k^2 = 1 - abar_t."""
    s = build(*args)
    t = int(np.random.default_rng(seed).integers(0, s.num_train_timesteps))
    x = np.zeros((t + 2, 1), dtype)
    x[0] = 1.0
    for k in range(t + 1):
        z = np.zeros_like(x)
        z[k + 1] = 1.0
        x = S.forward_step(s, x, z, k)
    assert x.dtype == dtype
    c, d = x[0, 0], x[1:, 0]
    tol = 1e-10 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(c, s.sqrt_alphas_cumprod[t], atol=tol)
    np.testing.assert_allclose(np.sum(d.astype(np.float64) ** 2), 1 - s.alphas_cumprod[t], atol=tol)
    ones = np.ones((1, 1), dtype)
    np.testing.assert_allclose(S.add_noise(s, ones, 0 * ones, t)[0, 0], s.sqrt_alphas_cumprod[t], atol=tol)


@settings(max_examples=5)
@given(st.sampled_from(SCHEDULES), st.sampled_from([0, 1, 9, 50, 199]))
def test_add_noise_equals_composed_forward_steps_empirically(name, t):
    """n = 20000 draws per method at x_0 = 0.7: both should be N(0.7 sqrt(abar_t), 1 - abar_t).
    Each sample mean has std sqrt(v / n) and each unbiased sample variance std v sqrt(2 / (n - 1));
    the difference of two independent estimates has sqrt(2) times that; we allow 4 of those."""
    s = S.make_schedule(200, name, 1e-4 if name != "scaled_linear" else 8.5e-4, 0.02)
    rng = np.random.default_rng(t)
    n = 20000
    x0 = np.full((n, 1), 0.7)
    direct = S.add_noise(s, x0, rng.standard_normal((n, 1)), t)
    x = x0
    for k in range(t + 1):
        x = S.forward_step(s, x, rng.standard_normal((n, 1)), k)
    v = 1 - s.alphas_cumprod[t]
    se_mean, se_var = np.sqrt(2 * v / n), np.sqrt(2) * v * np.sqrt(2 / (n - 1))
    assert abs(direct.mean() - x.mean()) < 4 * se_mean
    assert abs(direct.var(ddof=1) - x.var(ddof=1)) < 4 * se_var
    assert abs(direct.mean() - 0.7 * s.sqrt_alphas_cumprod[t]) < 4 * se_mean / np.sqrt(2)


def test_per_item_timesteps_match_one_int_calls():
    s = S.make_schedule(50)
    rng = np.random.default_rng(0)
    x0, eps = rng.standard_normal((4, 2, 3)), rng.standard_normal((4, 2, 3))
    t = np.array([0, 7, 49, 7])
    for f in (S.add_noise, S.get_velocity, S.forward_step):
        batched = f(s, x0, eps, t)
        for i in range(4):
            np.testing.assert_array_equal(batched[i], f(s, x0[i:i + 1], eps[i:i + 1], int(t[i]))[0])


@given(st.sampled_from(SCHEDULES), st.integers(0, 999), st.sampled_from(list(S.PREDICTION_TYPES)))
def test_prediction_conversions_round_trip(name, t, ptype):
    s = build(name, 1000, False)
    rng = np.random.default_rng(t)
    x0, eps = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    xt = S.add_noise(s, x0, eps, t)
    out = S.from_x0_eps(s, x0, eps, t, ptype)
    x0_hat, eps_hat = S.to_x0_eps(s, out, xt, t, ptype)
    # x0 = (x_t - sqrt(1-a) eps)/sqrt(a) loses ~ 1/sqrt(abar_t) ulps at the noisy end
    tol = 1e-12 / s.sqrt_alphas_cumprod[t]
    np.testing.assert_allclose(x0_hat, x0, atol=tol)
    np.testing.assert_allclose(eps_hat, eps, atol=tol / s.sqrt_one_minus_alphas_cumprod[t])


def test_float32_stays_float32_and_float64_stays_float64():
    s = S.make_schedule(10)
    for dt in (np.float32, np.float64):
        x = np.ones((2, 3), dt)
        assert S.add_noise(s, x, x, 3).dtype == dt
        assert S.get_velocity(s, x, x, np.array([1, 2])).dtype == dt
        assert all(a.dtype == dt for a in S.to_x0_eps(s, x, x, 3, "v_prediction"))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta_schedule="cosine"), "beta_schedule must be one of .*squaredcos_cap_v2"),
    (dict(num_train_timesteps=0), "num_train_timesteps must be an int >= 1"),
    (dict(num_train_timesteps=5, trained_betas=[0.1] * 4), r"trained_betas must have shape .*\(5,\)"),
    (dict(beta_start=0.0), r"betas must lie in \(0, 1\].*beta_start"),
    (dict(num_train_timesteps=1, rescale_betas_zero_snr=True), "rescale_betas_zero_snr needs"),
])
def test_make_schedule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.make_schedule(**kwargs)


def test_forward_bad_input():
    s = S.make_schedule(10)
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        S.add_noise(s, x, x, 10)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 10\)"):
        S.add_noise(s, x, x, np.array([0, -1]))
    with pytest.raises(ValueError, match=r"t must be one int or have shape \(N,\) = \(2,\)"):
        S.add_noise(s, x, x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="t must be an int or an integer array"):
        S.forward_step(s, x, x, 1.5)
    with pytest.raises(ValueError, match="shape mismatch"):
        S.add_noise(s, x, np.zeros((2, 4)), 1)
    with pytest.raises(ValueError, match="prediction_type must be one of .*v_prediction"):
        S.to_x0_eps(s, x, x, 1, "eps")


# ----------------------------------------------------------------------------- diffusers


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("rescale", [False, True])
def test_matches_diffusers_schedules(name, rescale):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr
    kw = dict(beta_start=8.5e-4, beta_end=0.012) if name == "scaled_linear" else {}
    ref = diffusers.DDPMScheduler(1000, beta_schedule=name, rescale_betas_zero_snr=rescale, **kw)
    ours = S.make_schedule(1000, name, rescale_betas_zero_snr=rescale, **kw)
    # diffusers builds its betas in float32: agreement to float32 rounding (a few ulps, rel ~1e-6);
    # its cumprod over 1000 float32 factors drifts by up to ~1000 * 6e-8 relative
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-7)
    if not rescale:
        np.testing.assert_allclose(ours.betas, ref.betas.double().numpy(), rtol=2e-6, atol=1e-7)
    else:  # float32 rescaling divides nearly equal abar's (betas off by ~1e-6 absolute); in float64 the
        # same algorithm agrees to rounding
        plain = S.make_schedule(1000, name, **kw).betas
        np.testing.assert_allclose(ours.betas, rescale_zero_terminal_snr(torch.from_numpy(plain.copy())).numpy(),
                                   rtol=1e-12, atol=1e-15)


def test_matches_diffusers_add_noise_velocity_snr():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr
    ours = S.make_schedule(1000, "squaredcos_cap_v2")
    ref = diffusers.DDPMScheduler(1000, beta_schedule="squaredcos_cap_v2")
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())  # float64 on both sides
    rng = np.random.default_rng(0)
    x0, eps, t = rng.standard_normal((5, 2, 3, 3)), rng.standard_normal((5, 2, 3, 3)), np.array([0, 1, 500, 998, 999])
    tt = torch.from_numpy(t)
    np.testing.assert_allclose(S.add_noise(ours, x0, eps, t),
                               ref.add_noise(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(S.get_velocity(ours, x0, eps, t),
                               ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(eps), tt).numpy(), rtol=1e-13, atol=1e-15)
    # compute_snr casts to float32 at the end
    np.testing.assert_allclose(ours.snr[t], compute_snr(ref, tt).double().numpy(), rtol=1e-6)
