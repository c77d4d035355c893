"""The score view and the Karras-style samplers against closed forms, with no trained network.

Data x_0 ~ N(mu, s^2) (DESIGN.md). In the VE view x = x_0 + sigma eps the noisy marginal is
N(mu, s^2 + sigma^2), so
    score       grad_x log p_sigma(x) = -(x - mu) / (s^2 + sigma^2)
    denoiser    D(x; sigma) = E[x_0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu)
    PF-ODE      dx/dsigma = (x - D) / sigma = sigma (x - mu) / (s^2 + sigma^2)
                => x(sigma) - mu = (x(sigma') - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma'^2)   (exact flow)
Every sampler ends with x_0 = D(x; sigma_min) (its step to sigma = 0), so its continuum limit from
x_start at sigma_max is D(flow(x_start, sigma_max -> sigma_min), sigma_min); the ODE samplers' error
against it must shrink at their order as the steps double.
"""

import numpy as np
import pytest

from minidiff.diffusion import schedule as S
from minidiff.diffusion import score as SC
from minidiff.diffusion.karras_samplers import (HeunHalf, dpmsolver_pp_2m_step, euler_ancestral_step, euler_step,
                                                heun_step, scale_model_input)
from minidiff.diffusion.karras_sampling import sample_karras
from minidiff.diffusion.sampler import sample
from minidiff.diffusion.sigmas import init_noise_sigma, karras_sigmas, make_sigmas, sigma_to_t, training_sigmas

SCHED = S.make_schedule()                                    # linear, T = 1000: sigma in [0.0100, 157.4]
LOG_SIGMAS = np.log(training_sigmas(SCHED))
PARAMS = [(0.5, 1.0), (-2.0, 0.3), (3.0, 3.0), (0.0, 0.1)]  # (mu, s)


def gaussian_model(mu, sd, ptype="epsilon"):
    """The exact output of each prediction type at the VP input x_t, at sigma(t) = exp(interp(t, log sigma_t)),
    the exact inverse of sigma_to_t (so a sampler fed timesteps = sigma_to_t(sigmas) sees eps*(sigma))."""
    def model_fn(x, t, cond):
        s = np.exp(np.interp(np.asarray(t, np.float64), np.arange(len(LOG_SIGMAS)), LOG_SIGMAS))
        a = (1 / (1 + s**2)).reshape((-1,) + (1,) * (x.ndim - 1))
        sig2 = a * sd**2 + 1 - a
        e = np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / sig2
        x0 = mu + np.sqrt(a) * sd**2 / sig2 * (x - np.sqrt(a) * mu)
        return {"epsilon": e, "sample": x0, "v_prediction": np.sqrt(a) * e - np.sqrt(1 - a) * x0}[ptype]
    return model_fn


def karras_schedule(sampler, n):
    """Karras sigmas with fractional timesteps sigma_to_t(sigma) (not rounded: the model sees the step's sigma)."""
    _, sg = make_sigmas(SCHED, n, sampler, use_karras_sigmas=True)
    return sigma_to_t(SCHED, sg[:-1]), sg


# ----------------------------------------------------------------------------- the score view


@pytest.mark.parametrize("ptype", S.PREDICTION_TYPES)
def test_score_view_of_each_prediction_type_is_the_exact_gaussian_score(ptype):
    mu, sd, t = 0.7, 0.4, np.array([0, 10, 500, 999])
    rng = np.random.default_rng(0)
    x_t = rng.standard_normal((4, 3))
    a = SCHED.alphas_cumprod[t][:, None]
    out = gaussian_model(mu, sd, ptype)(x_t, sigma_to_t(SCHED, training_sigmas(SCHED)[t]), None)
    exact_vp = -(x_t - np.sqrt(a) * mu) / (a * sd**2 + 1 - a)                 # N(sqrt(a) mu, a s^2 + 1 - a)
    np.testing.assert_allclose(SC.score(SCHED, out, x_t, t, ptype), exact_vp, rtol=1e-8, atol=1e-10)
    for i, ti in enumerate(t):                                               # the VE view, item by item
        sigma = SC.sigma_from_alphas_cumprod(SCHED.alphas_cumprod[ti])
        x = SC.vp_to_ve(x_t[i:i + 1], sigma)
        np.testing.assert_allclose(SC.ve_to_vp(x, sigma), x_t[i:i + 1], rtol=1e-15)
        D = SC.denoised(out[i:i + 1], x, sigma, ptype)
        np.testing.assert_allclose(D, mu + sd**2 / (sd**2 + sigma**2) * (x - mu), rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(SC.score_ve(x, D, sigma), -(x - mu) / (sd**2 + sigma**2), rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(SC.pf_ode_derivative(x, D, sigma), -sigma * SC.score_ve(x, D, sigma), rtol=1e-12)
        np.testing.assert_allclose(SC.score_from_eps(SC.score(SCHED, out[i:i + 1], x_t[i:i + 1], ti, ptype) * 0
                                                     + (x_t[i:i + 1] - np.sqrt(a[i]) * mu) * np.sqrt(1 - a[i])
                                                     / (a[i] * sd**2 + 1 - a[i]), a[i, 0]), exact_vp[i:i + 1],
                                   rtol=1e-12)
    np.testing.assert_allclose(SC.alphas_cumprod_from_sigma(SC.sigma_from_alphas_cumprod(SCHED.alphas_cumprod)),
                               SCHED.alphas_cumprod, rtol=1e-13)


def test_karras_sigmas_and_sigma_to_t():
    """Karras eq. 5 by hand at its ends and middle; sigma_to_t inverts the training sigmas; t(0) = 0."""
    s = karras_sigmas(0.01, 80.0, 3)
    np.testing.assert_allclose(s, [80.0, ((80 ** (1 / 7) + 0.01 ** (1 / 7)) / 2) ** 7, 0.01], rtol=1e-14)
    np.testing.assert_allclose(sigma_to_t(SCHED, training_sigmas(SCHED)), np.arange(1000), atol=1e-9)
    assert sigma_to_t(SCHED, 0.0) == 0.0 and sigma_to_t(SCHED, 1e6) == 999.0
    ts, sg = make_sigmas(SCHED, 4, "dpm++2m", use_karras_sigmas=True)
    assert np.all(ts == np.round(ts)) and sg[-1] == 0 and sg[0] == pytest.approx(training_sigmas(SCHED)[-1])
    assert make_sigmas(SCHED, 4, "euler", final_sigmas_type="sigma_min")[1][-1] == training_sigmas(SCHED)[0]


# ----------------------------------------------------------------------------- convergence order


def final_error(sampler, n, mu, sd):
    """max |x_0 - continuum limit| over three starting points, with the exact flow from sigma_max to sigma_min."""
    ts, sg = karras_schedule(sampler, n)
    z = np.array([[-2.0], [0.0], [1.5]])
    out = sample_karras(gaussian_model(mu, sd), z.shape, SCHED, sampler, timesteps=ts, sigmas=sg, x_T=z,
                        dtype=np.float64)
    x = SC.vp_to_ve(z, sg[0]) if sampler == "dpm++2m" else z * init_noise_sigma(sg, sampler)   # the VE start
    s_min, s_max = sg[-2], sg[0]
    x_min = mu + (x - mu) * np.sqrt(sd**2 + s_min**2) / np.sqrt(sd**2 + s_max**2)
    return np.max(np.abs(out - (mu + sd**2 / (sd**2 + s_min**2) * (x_min - mu))))


@pytest.mark.parametrize("sampler,order", [("euler", 1), ("heun", 2), ("dpm++2m", 2)])
@pytest.mark.parametrize("mu,sd", PARAMS)
def test_ode_samplers_converge_at_their_order(sampler, order, mu, sd):
    """slope = -d log2(error) / d log2(n), least squares over n = 40, 80, 160 (Karras sigmas), within 0.3
    of the order. Measured: Euler 0.99 - 1.00, Heun 2.04 - 2.08, DPM-Solver++(2M) 2.02 - 2.16 (at
    n = 10 -> 20 DPM-Solver++ is not yet asymptotic: its error can even grow, e.g. mu = 0, s = 0.1)."""
    ns = np.array([40, 80, 160])
    errs = np.array([final_error(sampler, n, mu, sd) for n in ns])
    slope = -np.polyfit(np.log2(ns), np.log2(errs), 1)[0]
    assert abs(slope - order) < 0.3, (sampler, errs, slope)


# ----------------------------------------------------------------------------- the ancestral sampler's law


def exact_law(n, mu, sd, karras):
    """(mean, var) of Euler ancestral's output, from the implementation by linearity (as for DDPM: a row
    with x_T = 0 and no noise gives b, a row with x_T = 1 gives b + A, a row with z_k = 1 gives b + c_k)."""
    B = n + 2
    x_T = np.zeros((B, 1))
    x_T[1] = 1.0
    noises = np.zeros((n, B, 1))
    noises[np.arange(n), np.arange(n) + 2] = 1.0
    out = sample_karras(gaussian_model(mu, sd), (B, 1), SCHED, "euler_a", n, karras, x_T=x_T, noises=noises,
                        dtype=np.float64)[:, 0]
    b = out[0]
    return np.array([b, (out[1] - b) ** 2 + np.sum((out[2:] - b) ** 2)])


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("mu,sd", [(0.5, 1.0), (-2.0, 0.5), (1.0, 2.0)])
def test_euler_ancestral_matches_its_exact_law_within_monte_carlo_error(mu, sd, karras):
    """n = N D = 16,000 iid draws at 25 steps; 4 standard errors (mean sqrt(v / n), variance v sqrt(2 / (n - 1))).
    The law itself: mean within 2e-4 of mu (the start N(0, sigma_max^2) is almost the true marginal); variance
    below s^2 by a first-order discretization error (-25% .. -38% at 25 steps, measured; it halves as the
    steps double, checked against the continuum law of the reverse SDE in the next test)."""
    N, D, n = 2000, 8, 25
    law = exact_law(n, mu, sd, karras)
    x = sample_karras(gaussian_model(mu, sd), (N, D), SCHED, "euler_a", n, karras, seed=3, dtype=np.float64)
    se_m, se_v = np.sqrt(law[1] / x.size), law[1] * np.sqrt(2 / (x.size - 1))
    assert abs(x.mean() - law[0]) < 4 * se_m and abs(x.var(ddof=1) - law[1]) < 4 * se_v
    assert abs(law[0] - mu) < 2e-4 and -0.4 * sd**2 < law[1] - sd**2 < 0


@pytest.mark.parametrize("mu,sd", [(0.5, 1.0), (-2.0, 0.5), (1.0, 2.0)])
def test_euler_ancestral_law_converges_to_the_reverse_sde(mu, sd):
    """Continuum limit (Karras sigmas, consistent with the model): from x ~ N(0, sigma_max^2), x_0 | x ~
    q(x_0 | x) = N(mu + k (x - mu), s^2 sigma_max^2 / (s^2 + sigma_max^2)), k = s^2 / (s^2 + sigma_max^2),
    minus the posterior variance s^2 sigma_min^2 / (s^2 + sigma_min^2) that the last step (to sigma = 0,
    no noise) leaves out. The mean matches to rounding; the variance error halves as the steps double
    (measured ratios 0.52 - 0.58 from 25 to 200 steps)."""
    errs = []
    for n in (25, 50, 100):
        _, sg = make_sigmas(SCHED, n, "euler_a", use_karras_sigmas=True)
        s_max, s_min = sg[0], sg[-2]
        k = sd**2 / (sd**2 + s_max**2)
        cont = np.array([mu - k * mu, k**2 * s_max**2 + sd**2 * s_max**2 / (sd**2 + s_max**2)
                         - sd**2 * s_min**2 / (sd**2 + s_min**2)])
        e = exact_law(n, mu, sd, True) - cont
        assert abs(e[0]) < 1e-12
        errs.append(e[1])
    assert 0.45 < errs[1] / errs[0] < 0.65 and 0.45 < errs[2] / errs[1] < 0.65


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpm++2m"])
def test_prediction_types_give_identical_samplers(sampler):
    """The exact model of each type, at the step's own sigma (karras_schedule), gives the same samples."""
    ts, sg = karras_schedule(sampler, 12)
    runs = [sample_karras(gaussian_model(0.3, 0.8, p), (16, 2), SCHED, sampler, prediction_type=p, seed=1,
                          dtype=np.float64, timesteps=ts, sigmas=sg) for p in S.PREDICTION_TYPES]
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(runs[2], runs[0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "heun", "dpm++2m"])
def test_a_learned_variance_output_is_stripped_to_its_first_c_channels(sampler):
    """A (N, 2C) output (learned / learned_range) samples as its first C channels alone: the variance is unused."""
    model = gaussian_model(0.3, 0.8)
    calls = []

    def with_variance(x, t, cond):
        calls.append(1)
        return np.concatenate([model(x, t, cond), np.full_like(x, np.nan)], axis=1)   # any variance: unread
    plain = sample(model, (4, 3), SCHED, sampler, 8, seed=2, dtype=np.float64)
    for vt in ("learned", "learned_range"):
        np.testing.assert_array_equal(sample(with_variance, (4, 3), SCHED, sampler, 8, seed=2, dtype=np.float64,
                                             variance_type=vt), plain)
        np.testing.assert_array_equal(sample_karras(with_variance, (4, 3), SCHED, sampler, 8, seed=2,
                                                    dtype=np.float64, variance_type=vt), plain)
    assert calls
    for name in (sampler, "ddim", "ddpm"):                  # a C-channel output with a learned type: one line
        with pytest.raises(ValueError, match=r"2C = 6 channels .*'learned_range', got shape \(4, 3\)") as err:
            sample(model, (4, 3), SCHED, name, 8, variance_type="learned_range")
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_is_one_line_naming_the_argument():
    x = np.zeros((2, 3))
    m = gaussian_model(0.0, 1.0)
    cases = [
        (lambda: sample(m, (2, 3), SCHED, "lms"), "sampler must be one of"),
        (lambda: sample(m, (2, 3), SCHED, "euler", 0), r"num_inference_steps must be in \[1, 1000\]"),
        (lambda: sample(m, (2, 3), SCHED, "dpm++2m", 1001), r"num_inference_steps must be in \[1, 1000\]"),
        (lambda: sample(m, (2, 3), SCHED, "dpm++2m", 1000), "repeats a noise level"),
        (lambda: sample(m, (2, 3), SCHED, "ddim", 10, use_karras_sigmas=True), "use_karras_sigmas .*needs sampler"),
        (lambda: sample(m, (2, 3), SCHED, "euler", 10, eta=0.5), "eta, timesteps and prev_timesteps"),
        (lambda: make_sigmas(SCHED, 10, "heun", final_sigmas_type="sigma_min"), "final_sigmas_type must be 'zero'"),
        (lambda: make_sigmas(SCHED, 10, "euler", timestep_spacing="uniform"), "timestep_spacing must be one of"),
        (lambda: sample_karras(m, (2, 3), SCHED, "euler", timesteps=[5.0]), "pass timesteps and sigmas together"),
        (lambda: sample_karras(m, (2, 3), SCHED, "euler", timesteps=[5.0], sigmas=[1.0, 2.0]), "sigmas must be"),
        (lambda: sample_karras(m, (2, 3), SCHED, "heun", timesteps=[5.0], sigmas=[1.0, 0.5]), "end at 0"),
        (lambda: sample_karras(m, (2, 3), SCHED, "euler_a", 3, noises=[x]), "one entry per step"),
        (lambda: euler_step(x, 1.0, 2.0, x), r"sigma_next must be in \[0, sigma"),
        (lambda: euler_step(x, 0.0, 0.0, x), "sigma must be a finite float > 0"),
        (lambda: euler_step(x, 1.0, 0.5, x, "eps"), "prediction_type must be one of"),
        (lambda: euler_step(np.zeros((2, 4)), 1.0, 0.5, x), "shape mismatch"),
        (lambda: euler_ancestral_step(x, 1.0, 0.5, x, None), "noise is required"),
        (lambda: heun_step(x, 1.0, 0.5, x, first_half=(x, 0.5, x)), "first_half must be the HeunHalf"),
        (lambda: heun_step(x, 1.0, 0.0, x, first_half=HeunHalf(x, -1.0, x)), "no second half-step"),
        (lambda: dpmsolver_pp_2m_step(x, 1.0, 0.5, x, history=[x, x]), "history must be"),
        (lambda: dpmsolver_pp_2m_step(x, 1.0, 0.5, x, history=((2.0, np.zeros((2, 4))),)), "history must hold"),
        (lambda: dpmsolver_pp_2m_step(x, 1.0, 0.5, x, history=((0.5, x),)), "history must hold"),
        (lambda: scale_model_input(x, 1.0, "ddim"), "sampler must be one of"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value)
