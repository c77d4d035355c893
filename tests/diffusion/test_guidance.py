"""Classifier-free and classifier guidance against a two-class Gaussian mixture with closed-form scores.

Data: y in {0, 1} with p(y) = 1/2, x_0 | y ~ N(m_y, s^2), m = (-1, +1), s = 0.7; label 2 = null.
At noise level a = abar_t, x_t | y ~ N(sqrt(a) m_y, sig2), sig2 = a s^2 + 1 - a, so
  eps_y(x)   = sqrt(1 - a) (x - sqrt(a) m_y) / sig2               (the Gaussian optimum per class)
  r_y(x)     = p(y | x_t) = softmax_y(-(x - sqrt(a) m_y)^2 / (2 sig2))
  eps_u(x)   = sum_y r_y eps_y                                    (the mixture's optimum)
  grad_x log p(y | x_t) = sum_y' r_y' sqrt(a) (m_y - m_y') / sig2
Monte-Carlo tolerances are 4 standard errors: a proportion p of n draws has sqrt(p (1 - p) / n).
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.diffusion import guidance as G
from minidiff.diffusion import sampler as SM
from minidiff.diffusion import schedule as S

SCHED = S.make_schedule()
M, SD, NULL = np.array([-1.0, 1.0]), 0.7, 2
DDIM = dict(sampler="ddim", num_inference_steps=50, dtype=np.float64)


def _parts(x, t):
    a = SCHED.alphas_cumprod[np.asarray(t)][:, None]                   # (N, 1)
    sig2 = a * SD**2 + 1 - a
    eps_y = np.sqrt(1 - a) * (x - np.sqrt(a) * M) / sig2               # (N, 2): x (N, 1) against both means
    logits = -((x - np.sqrt(a) * M) ** 2) / (2 * sig2)
    r = np.exp(logits - logits.max(1, keepdims=True))
    return a, sig2, eps_y, r / r.sum(1, keepdims=True)


def mixture_model(x, t, cond):
    """x (N, 1), t (N,), cond (N,) in {0, 1, NULL} -> eps (N, 1)."""
    _, _, eps_y, r = _parts(x, t)
    cond = np.asarray(cond)
    eps_u = (r * eps_y).sum(1)
    return np.where(cond == NULL, eps_u, eps_y[np.arange(len(x)), np.clip(cond, 0, 1)])[:, None]


def grad_log_p(x, t, y):
    a, sig2, _, r = _parts(x, t)
    y = np.asarray(y)
    return (r * np.sqrt(a) * (M[y][:, None] - M) / sig2).sum(1, keepdims=True)


def labels(y, n):
    return np.full(n, y)


# ----------------------------------------------------------------------------- formulas


@given(st.floats(-5, 5), st.integers(0, 1000))
def test_cfg_formula_and_conventions(s, seed):
    rng = np.random.default_rng(seed)
    u, c = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(G.cfg(u, c, 1.0), c, rtol=0, atol=1e-15)  # s = 1: conditional (u + (c - u) rounds)
    np.testing.assert_array_equal(G.cfg(u, c, 0.0), u)                   # s = 0: unconditional
    w = G.guidance_scale_to_w(s)
    assert w == s - 1 and G.w_to_guidance_scale(w) == pytest.approx(s)
    np.testing.assert_allclose(G.cfg(u, c, s), (1 + w) * c - w * u, rtol=1e-12, atol=1e-12)  # Ho & Salimans eq. 6


def test_rescale_noise_cfg_by_hand():
    rng = np.random.default_rng(0)
    cfg_out, cond = 3 * rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 4))
    np.testing.assert_array_equal(G.rescale_noise_cfg(cfg_out, cond, 0.0), cfg_out)
    full = G.rescale_noise_cfg(cfg_out, cond, 1.0)
    for i in range(2):  # phi = 1: each item's std (ddof = 1, over C, H, W) becomes the conditional one
        assert np.std(full[i], ddof=1) == pytest.approx(np.std(cond[i], ddof=1), rel=1e-12)
    half = G.rescale_noise_cfg(cfg_out, cond, 0.5)
    np.testing.assert_allclose(half, 0.5 * full + 0.5 * cfg_out, rtol=1e-12)


def test_rescale_noise_cfg_matches_diffusers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers.guiders.guider_utils import rescale_noise_cfg
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 4, 5, 5)), rng.standard_normal((3, 4, 5, 5))
    for phi in (0.0, 0.3, 0.7, 1.0):
        want = rescale_noise_cfg(torch.from_numpy(a), torch.from_numpy(b), phi).numpy()
        np.testing.assert_allclose(G.rescale_noise_cfg(a, b, phi), want, rtol=1e-12, atol=1e-14)


def test_batched_helper_makes_one_call_uncond_first():
    calls = []

    def model_fn(x, t, cond):
        calls.append((x.shape, t.tolist(), cond.tolist()))
        return mixture_model(x, t, cond)

    rng = np.random.default_rng(2)
    x, t, y = rng.standard_normal((3, 1)), np.array([5, 500, 999]), np.array([0, 1, 1])
    out = G.cfg_model_output(model_fn, x, t, y, NULL, 2.5)
    assert calls == [((6, 1), [5, 500, 999] * 2, [NULL] * 3 + [0, 1, 1])]
    want = G.cfg(mixture_model(x, t, labels(NULL, 3)), mixture_model(x, t, y), 2.5)
    np.testing.assert_allclose(out, want, rtol=1e-14)


def test_batched_helper_learned_variance_channels():
    def model_fn(x, t, cond):   # (N, 2C, L): eps channels then variance channels
        c = np.asarray(cond, np.float64)[:, None, None]
        return np.concatenate([x * (1 + c), 0.1 * c + 0 * x], axis=1)

    x = np.ones((2, 3, 4))
    out = G.cfg_model_output(model_fn, x, np.array([1, 1]), np.array([1, 2]), 0, 3.0)
    assert out.shape == (2, 6, 4)
    np.testing.assert_allclose(out[:, :3], x * (1 + 3.0 * np.array([1, 2])[:, None, None]))
    np.testing.assert_allclose(out[:, 3:], 0.1 * np.array([1, 2])[:, None, None] + 0 * x)  # the conditional branch's


# ----------------------------------------------------------------------------- CFG on the mixture


def test_cfg_s1_is_conditional_and_s0_is_unconditional_sampling():
    N = 256
    for s, ref_cond in ((1.0, labels(1, N)), (0.0, labels(NULL, N))):
        guided = SM.sample(G.make_guided_model_fn(mixture_model, s, NULL), (N, 1), SCHED, cond=labels(1, N), seed=3, **DDIM)
        plain = SM.sample(mixture_model, (N, 1), SCHED, cond=ref_cond, seed=3, **DDIM)
        np.testing.assert_allclose(guided, plain, rtol=1e-12, atol=1e-12)


@settings(max_examples=2)
@given(st.integers(0, 2**31 - 1))
def test_cfg_distributions_on_the_mixture(seed):
    """s = 1 (class 1) puts ~P(N(1, 0.49) > 0) = 0.92 of the mass right of 0; s = 0 gives the mixture,
    which is symmetric (so is the sampler: eps_u(-x) = -eps_u(x)), hence P(x > 0) = 1/2 and mean 0 exactly;
    s = 3 pushes samples away from class 0: larger mean, less mass left of 0 (common random numbers)."""
    N = 4000
    run = {s: SM.sample(G.make_guided_model_fn(mixture_model, s, NULL), (N, 1), SCHED, cond=labels(1, N),
                        seed=seed, **DDIM)[:, 0] for s in (0.0, 1.0, 3.0)}
    se = lambda p: np.sqrt(p * (1 - p) / N)  # noqa: E731
    p0, p1, p3 = ((run[s] > 0).mean() for s in (0.0, 1.0, 3.0))
    assert abs(p0 - 0.5) < 4 * se(0.5) and abs(run[0.0].mean()) < 4 * run[0.0].std() / np.sqrt(N)
    assert p1 > 0.5 + 8 * se(0.5)                        # class-conditional mass, far from the mixture's 1/2
    assert p3 > p1 + 4 * se(p1)
    d = run[3.0] - run[1.0]
    assert d.mean() > 4 * d.std() / np.sqrt(N) and np.mean(d > 0) > 0.99


# ----------------------------------------------------------------------------- classifier guidance


@given(st.floats(-4, 4), st.integers(0, 999), st.integers(0, 1))
def test_classifier_guidance_with_exact_classifier_gives_conditional_eps(x, t, y):
    """eps_u - sqrt(1 - a) grad log p(y | x_t) = eps_y exactly (Bayes: score_y = score_u + grad log p(y | x))."""
    xs, ts, ys = np.array([[x]]), np.array([t]), np.array([y])
    eps_hat = G.classifier_guided_eps(SCHED, mixture_model(xs, ts, [NULL]), xs, ts, grad_log_p, 1.0, y=ys)
    np.testing.assert_allclose(eps_hat, mixture_model(xs, ts, ys), rtol=1e-9, atol=1e-12)


@settings(max_examples=2)
@given(st.integers(0, 2**31 - 1))
def test_classifier_guidance_moves_mass_to_the_target(seed):
    """Unconditional model + classifier toward y: scale 0 leaves the mixture (P(x > 0) = 1/2), scale 1
    is exactly class-conditional sampling, scale 3 moves more mass further to the target side."""
    N = 4000

    def uncond(x, t, cond):
        return mixture_model(x, t, labels(NULL, len(x)))

    def run(scale, y, ptype="epsilon"):
        base = uncond if ptype == "epsilon" else v_of(uncond)
        fn = G.make_classifier_guided_model_fn(base, SCHED, grad_log_p, scale, prediction_type=ptype)
        return SM.sample(fn, (N, 1), SCHED, cond=labels(y, N), seed=seed, prediction_type=ptype, **DDIM)[:, 0]

    se = np.sqrt(0.25 / N)
    r0, r1, r3 = run(0.0, 1), run(1.0, 1), run(3.0, 1)
    assert abs((r0 > 0).mean() - 0.5) < 4 * se
    cond = SM.sample(mixture_model, (N, 1), SCHED, cond=labels(1, N), seed=seed, **DDIM)[:, 0]
    np.testing.assert_allclose(r1, cond, rtol=1e-9, atol=1e-9)
    assert (r1 > 0).mean() > 0.5 + 8 * se and (r3 > 0).mean() > (r1 > 0).mean() + 4 * se
    assert (run(3.0, 0) < 0).mean() > (r1 > 0).mean() + 4 * se        # and toward class 0 by symmetry
    np.testing.assert_allclose(run(3.0, 1, "v_prediction"), r3, rtol=1e-8, atol=1e-8)


def v_of(eps_fn):
    def model_fn(x, t, cond):
        a = SCHED.alphas_cumprod[np.asarray(t)][:, None]
        e = eps_fn(x, t, cond)
        return np.sqrt(a) * e - np.sqrt(1 - a) * (x - np.sqrt(1 - a) * e) / np.sqrt(a)
    return model_fn


# ----------------------------------------------------------------------------- bad input


def test_guidance_bad_input():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        G.cfg(x, np.zeros((2, 4)), 2.0)
    with pytest.raises(ValueError, match=r"guidance_rescale must be in \[0, 1\]"):
        G.rescale_noise_cfg(x, x, 1.5)
    with pytest.raises(ValueError, match="cond must be given"):
        G.cfg_model_output(mixture_model, x, np.array([1, 1]), None, NULL, 2.0)
    with pytest.raises(ValueError, match=r"cond must have shape \(N, ...\) with N = 2"):
        G.cfg_model_output(mixture_model, x, np.array([1, 1]), np.array([1, 1, 1]), NULL, 2.0)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        G.classifier_guided_eps(SCHED, x, x, 1000, lambda *a: x, 1.0)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        G.make_classifier_guided_model_fn(mixture_model, SCHED, grad_log_p, 1.0, prediction_type="x0")
