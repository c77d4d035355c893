"""The variational bound (diffusion/likelihood.py, diffusion/vlb.py) and the hybrid loss (diffusion/loss.py):

1. against a float64 PyTorch transcription of improved-diffusion (tests/oracles/improved_diffusion_vlb.py,
   its _extract_into_tensor's `.float()` switched off): normal_kl, the CDF, the decoder, _vb_terms_bpd for
   every variance type, calc_bpd_loop, _prior_bpd and the RESCALED_MSE learned-sigma loss with its autograd;
2. finite differences in float64, through random upstream gradients, of every hand-written derivative;
3. analytic checks: Gaussian data with the exact eps*, whose expected bound is closed-form (Monte Carlo within
   standard errors, and never below the true NLL); the prior term of the long linear schedule is ~0;
4. bad input: data off the 8-bit grid, a C-channel output for a learned variance, a NaN term named by t.
"""

import math

import numpy as np
import pytest
from gradcheck import check_grads, needs, rel_error

from minidiff.diffusion import likelihood as LK
from minidiff.diffusion import loss as L
from minidiff.diffusion import schedule as S
from minidiff.diffusion import vlb as V

SCHED = S.make_schedule(1000)
COSINE = S.make_schedule(1000, "squaredcos_cap_v2")


def data8(rng, shape):
    """8-bit data in [-1, 1], with both edge levels present."""
    x = rng.integers(0, 256, shape) / 127.5 - 1.0
    x.reshape(-1)[:2] = [-1.0, 1.0]
    return x


def np_model(learned):
    def fn(x, t, cond=None):
        tt = np.asarray(t, np.float64).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
        eps = 0.72 * x + 0.2 * np.sin(3.0 * tt + x)
        return np.concatenate([eps, np.tanh(0.7 * x - 2.0 * tt + 0.3)], axis=1) if learned else eps
    return fn


def th_model(learned):
    import torch as th

    def fn(x, t):
        tt = t.to(th.float64).reshape((-1,) + (1,) * (x.ndim - 1)) / 1000.0
        eps = 0.72 * x + 0.2 * th.sin(3.0 * tt + x)
        return th.cat([eps, th.tanh(0.7 * x - 2.0 * tt + 0.3)], dim=1) if learned else eps
    return fn


def ref_diffusion(schedule, variance_type, **kw):
    from oracles.improved_diffusion_vlb import GaussianDiffusion

    return GaussianDiffusion(schedule.betas, variance_type, **kw)


# ----------------------------------------------------------------------------- 1. improved-diffusion


@needs("torch")
def test_pieces_match_improved_diffusion():
    import torch as th
    from oracles import improved_diffusion_vlb as R

    rng = np.random.default_rng(0)
    m1, m2, lv1, lv2 = (rng.standard_normal((64,)) for _ in range(4))
    T = th.from_numpy
    assert rel_error(LK.normal_kl(m1, lv1, m2, lv2), R.normal_kl(T(m1), T(lv1), T(m2), T(lv2)).numpy()) < 1e-15
    z = rng.standard_normal(1000) * 3
    assert rel_error(LK.approx_standard_normal_cdf(z), R.approx_standard_normal_cdf(T(z)).numpy()) < 1e-15
    x = data8(rng, (4, 3, 8, 8))
    means, log_scales = 0.9 * x + 0.05 * rng.standard_normal(x.shape), rng.uniform(-7, -1, x.shape)
    ours = LK.discretized_gaussian_log_likelihood(x, means, log_scales)
    ref = R.discretized_gaussian_log_likelihood(T(x), means=T(means), log_scales=T(log_scales)).numpy()
    # the same arithmetic, but NumPy's and torch's tanh differ in the last bit: Phi(a+) - Phi(a-) then carries an
    # absolute error ~1e-16, which the log turns into ~1e-16 / p (measured 4e-6 at p ~ 3e-11): compare p itself,
    # and the log where p is not tiny
    assert np.abs(np.exp(ours) - np.exp(ref)).max() < 1e-15
    big = ref > np.log(1e-3)
    assert big.sum() > 20 and np.abs(ours - ref)[big].max() < 1e-12


@needs("torch")
@pytest.mark.parametrize("schedule", [SCHED, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("clip", [False, True])
def test_vb_terms_match_improved_diffusion(schedule, variance_type, clip):
    import torch as th

    rng = np.random.default_rng(1)
    t = np.array([0, 0, 1, 2, 10, 500, 998, 999])
    x0 = data8(rng, (8, 3, 4, 4))
    x_t = S.add_noise(schedule, x0, rng.standard_normal(x0.shape), t)
    learned = variance_type == "learned_range"
    out = np_model(learned)(x_t, t)
    ours = V.vb_terms_bpd(schedule, out, x0, x_t, t, variance_type, clip_denoised=clip)
    ref = ref_diffusion(schedule, variance_type)._vb_terms_bpd(
        lambda x, tt: th.from_numpy(out), th.from_numpy(x0), th.from_numpy(x_t), th.from_numpy(t), clip_denoised=clip)
    err = np.abs(ours["output"] - ref["output"].numpy()) / np.abs(ref["output"].numpy())
    assert err.max() < 1e-9, err          # measured: ~1e-12 (the KL at t = 999 is ~1e-6 bits of cancellation)
    np.testing.assert_allclose(ours["pred_xstart"], ref["pred_xstart"].numpy(), rtol=1e-13, atol=1e-13)


@needs("torch")
def test_learned_is_the_log_variance_in_improved_diffusion_and_the_variance_here():
    """The one convention that differs: diffusers (and minidiff's sampler) read 'learned' as the variance."""
    import torch as th

    rng = np.random.default_rng(2)
    t = np.array([0, 3, 400, 999])
    x0 = data8(rng, (4, 2, 3, 3))
    x_t = S.add_noise(SCHED, x0, rng.standard_normal(x0.shape), t)
    eps, log_var = rng.standard_normal(x0.shape), rng.uniform(-9, -3, x0.shape)
    ours = V.vb_terms_bpd(SCHED, np.concatenate([eps, np.exp(log_var)], 1), x0, x_t, t, "learned")["output"]
    ref = ref_diffusion(SCHED, "learned")._vb_terms_bpd(lambda x, tt: th.from_numpy(np.concatenate([eps, log_var], 1)),
                                                         th.from_numpy(x0), th.from_numpy(x_t), th.from_numpy(t),
                                                         clip_denoised=False)
    assert rel_error(ours, ref["output"].numpy()) < 1e-12


@needs("torch")
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_calc_bpd_loop_matches_improved_diffusion(variance_type):
    import torch as th

    sched = S.make_schedule(100, beta_start=1e-3, beta_end=0.2)   # improved-diffusion's "linear" at T = 100
    rng = np.random.default_rng(3)
    x0 = data8(rng, (3, 3, 4, 4))
    noises = rng.standard_normal((100,) + x0.shape)
    learned = variance_type == "learned_range"
    ours = V.calc_bpd_loop(np_model(learned), sched, x0, variance_type=variance_type, noises=noises)
    ref = ref_diffusion(sched, variance_type).calc_bpd_loop(th_model(learned), th.from_numpy(x0),
                                                            [th.from_numpy(n) for n in noises])
    for key in ("total_bpd", "prior_bpd", "vb", "xstart_mse"):
        assert rel_error(ours[key], ref[key].numpy()) < 1e-12, key
    assert rel_error(ours["mse"], ref["mse"].numpy()) < 1e-10   # eps^ from x0^: the same formula rearranged
    assert ours["timesteps"].tolist() == list(range(99, -1, -1)) and np.all(ours["weights"] == 1)


@needs("torch")
def test_float32_extract_rounds_the_last_kl_term():
    """improved-diffusion as shipped casts its coefficients to float32: at t = 999 (fixed_small, clipped)
    the KL is ~7e-7 bits and that cast moves it by a large fraction; the float64 transcription agrees with us."""
    import torch as th

    rng = np.random.default_rng(4)
    x0 = data8(rng, (4, 3, 8, 8))
    t = np.full(4, 999)
    x_t = S.add_noise(SCHED, x0, rng.standard_normal(x0.shape), t)
    out = np_model(False)(x_t, t)
    ours = V.vb_terms_bpd(SCHED, out, x0, x_t, t, clip_denoised=True)["output"]
    args = (lambda x, tt: th.from_numpy(out), th.from_numpy(x0), th.from_numpy(x_t), th.from_numpy(t))
    f64 = ref_diffusion(SCHED, "fixed_small")._vb_terms_bpd(*args)["output"].numpy()
    f32 = ref_diffusion(SCHED, "fixed_small", float32_extract=True)._vb_terms_bpd(*args)["output"].numpy()
    assert np.all(ours < 1e-5) and rel_error(ours, f64) < 1e-9
    print("float32-extract relative error of the t = 999 KL:", rel_error(f32, f64), "bits:", f64)
    assert rel_error(f32, f64) > 1e-3    # measured ~0.2: float32 coefficients are no oracle for this term


@needs("torch")
@pytest.mark.parametrize("t0", [0, 7])
def test_hybrid_loss_matches_rescaled_mse_and_its_autograd(t0):
    """L_simple + 0.001 T L_t is improved-diffusion's RESCALED_MSE loss (batch mean); its gradient with respect
    to the model output matches torch autograd through the same formula (mean detached) at rel < 1e-10."""
    import torch as th

    rng = np.random.default_rng(5)
    t = np.array([t0, 1, 250, 999])
    x0 = data8(rng, (4, 3, 4, 4))
    noise = rng.standard_normal(x0.shape)
    out = np.concatenate([rng.standard_normal(x0.shape), np.tanh(rng.standard_normal(x0.shape))], axis=1)
    loss, dout = L.hybrid_loss(SCHED, out, x0, noise, t)
    out_t = th.from_numpy(out.copy()).requires_grad_(True)
    terms = ref_diffusion(SCHED, "learned_range").training_losses_rescaled_mse(
        lambda x, tt: out_t, th.from_numpy(x0), th.from_numpy(t), th.from_numpy(noise))
    ref_loss = terms["loss"].mean()
    ref_loss.backward()
    assert abs(float(loss) - ref_loss.item()) < 1e-13 * abs(ref_loss.item())
    assert rel_error(dout, out_t.grad.numpy()) < 1e-10


# ----------------------------------------------------------------------------- 2. finite differences


def test_gradcheck_kl_and_decoder_derivatives():
    rng = np.random.default_rng(6)
    m1, lv1, m2 = rng.standard_normal((3, 5, 4))
    lv2 = rng.standard_normal((5, 4))
    check_grads(lambda lv2: LK.normal_kl(m1, lv1, m2, lv2), {"lv2": lv2},
                lambda g: {"lv2": g * LK.normal_kl_dlogvar2(m1, lv1, m2, lv2)})
    x = data8(rng, (6, 2, 4, 4))
    ls = rng.uniform(-6, -2, x.shape)
    means = x + np.exp(ls) * rng.standard_normal(x.shape)   # |a+-| ~ 1: away from the cancellation of Phi(a+) - Phi(a-)
    check_grads(lambda ls: LK.discretized_gaussian_log_likelihood(x, means, ls), {"ls": ls},
                lambda g: {"ls": g * LK.discretized_gaussian_log_likelihood_dlogscale(x, means, ls)[1]}, h=1e-6)
    check_grads(lambda ls: LK.gaussian_log_likelihood(x, means, ls), {"ls": ls},
                lambda g: {"ls": g * LK.gaussian_log_likelihood_dlogscale(x, means, ls)})
    z = rng.standard_normal(50) * 2
    check_grads(lambda z: LK.approx_standard_normal_cdf(z), {"z": z},
                lambda g: {"z": g * LK.approx_standard_normal_pdf(z)})


@pytest.mark.parametrize("variance_type", ["learned_range", "learned"])
@pytest.mark.parametrize("decoder", ["discretized", "continuous"])
def test_gradcheck_vb_terms_wrt_the_variance_output(variance_type, decoder):
    rng = np.random.default_rng(7)
    t = np.array([0, 0, 1, 30, 600, 999])
    x0 = data8(rng, (6, 2, 3, 3))
    x_t = S.add_noise(SCHED, x0, rng.standard_normal(x0.shape), t)
    mean = rng.standard_normal(x0.shape) * 0.3
    v = np.tanh(rng.standard_normal(x0.shape)) if variance_type == "learned_range" else \
        np.exp(rng.uniform(-9, -3, x0.shape))

    def fwd(v):
        return V.vb_terms_bpd(SCHED, np.concatenate([mean, v], 1), x0, x_t, t, variance_type, decoder=decoder)["output"]

    def bwd(g):
        d = V.vb_terms_bpd(SCHED, np.concatenate([mean, v], 1), x0, x_t, t, variance_type, decoder=decoder,
                           with_grad=True)["dvar"]
        return {"v": g.reshape(-1, 1, 1, 1) * d}
    h = 1e-6 if variance_type == "learned_range" else 1e-9 * float(v.min())
    check_grads(fwd, {"v": v}, bwd, h=h, max_coords=None)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_gradcheck_hybrid_loss(prediction_type):
    """Both halves of d L_hybrid / d output: the mean channels get L_simple's gradient only (the vlb term sees a
    frozen copy of them), the variance channels the vlb term's; a random upstream scales the scalar loss."""
    rng = np.random.default_rng(8)
    t = np.array([0, 5, 700, 999])
    x0 = data8(rng, (4, 2, 3, 3))
    noise = rng.standard_normal(x0.shape)
    mean, v = rng.standard_normal(x0.shape), np.tanh(rng.standard_normal(x0.shape))
    frozen = mean.copy()

    def fwd(mean, v):
        simple, _ = L.diffusion_loss(SCHED, mean, x0, noise, t, prediction_type)
        x_t = S.add_noise(SCHED, x0, noise, t)
        vb = V.vb_terms_bpd(SCHED, np.concatenate([frozen, v], 1), x0, x_t, t, "learned_range", prediction_type)
        return simple + 0.001 * 1000 * vb["output"].mean()

    _, dout = L.hybrid_loss(SCHED, np.concatenate([mean, v], 1), x0, noise, t, prediction_type=prediction_type)
    check_grads(fwd, {"mean": mean, "v": v}, lambda g: {"mean": g * dout[:, :2], "v": g * dout[:, 2:]},
                max_coords=None)
    loss, _ = L.hybrid_loss(SCHED, np.concatenate([mean, v], 1), x0, noise, t, prediction_type=prediction_type)
    assert float(loss) == pytest.approx(float(fwd(mean, v)), rel=1e-14)


# ----------------------------------------------------------------------------- 3. analytic checks


def gaussian_bound_closed_form(schedule, mu, s):
    """E[L_vlb] per dim (nats) for x0 ~ N(mu, s^2), the exact eps*, fixed_small, a continuous decoder."""
    a = schedule.alphas_cumprod[:, None]
    var_post = s**2 * (1 - a) / (a * s**2 + 1 - a)            # Var(x0 | x_t): E (x0 - x0^)^2 with x0^ = E[x0 | x_t]
    c1, vq = schedule.posterior_mean_coef1[1:, None], schedule.posterior_variance[1:, None]
    kl = 0.5 * c1**2 * var_post[1:] / vq                       # sigma_t^2 = beta~_t: only the means differ
    sig0 = np.exp(schedule.posterior_log_variance_clipped[0])  # beta~_1 (clipped), mean coef 1 at t = 0
    dec = 0.5 * np.log(2 * np.pi * sig0) + var_post[0] / (2 * sig0)
    aT = schedule.alphas_cumprod[-1]
    prior = 0.5 * (-1 - np.log(1 - aT) + (1 - aT) + aT * (mu**2 + s**2))
    return kl.sum(0) + dec + prior


@pytest.mark.parametrize("dims", [1, 3])
def test_bound_of_gaussian_data_matches_its_closed_form_and_the_true_nll(dims):
    sched = S.make_schedule(200, beta_start=5e-4, beta_end=0.1)
    mu, s = np.array([0.3, -0.5, 0.0])[:dims], np.array([0.5, 0.2, 1.0])[:dims]
    rng = np.random.default_rng(9)
    n = 3000
    x0 = mu + s * rng.standard_normal((n, dims))

    def eps_star(x, t, cond=None):
        a = sched.alphas_cumprod[np.asarray(t)][:, None]
        return np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / (a * s**2 + 1 - a)

    res = V.calc_bpd_loop(eps_star, sched, x0, clip_denoised=False, decoder="continuous", seed=1)
    closed = gaussian_bound_closed_form(sched, mu, s).mean() / math.log(2)
    est, se = res["total_bpd"].mean(), res["total_bpd"].std() / math.sqrt(n)
    assert abs(est - closed) < 4 * se, (est, closed, se)
    true_nll = np.mean(0.5 * np.log(2 * np.pi * s**2) + 0.5) / math.log(2)
    assert closed >= true_nll and est >= true_nll, (closed, est, true_nll)


def test_prior_term_of_the_long_linear_schedule_is_nearly_zero():
    x0 = data8(np.random.default_rng(10), (8, 3, 4, 4))
    prior = V.prior_bpd(SCHED, x0)
    assert prior.shape == (8,) and np.all(prior > 0) and np.all(prior < 3e-5)


def test_strided_weights_and_timesteps():
    ts = V.strided_timesteps(1000, 5)
    assert ts.tolist() == [0, 1, 62, 250, 562, 999]
    w = V.bound_weights(ts, 1000)
    assert w.tolist() == [1, 31, 124.5, 250, 374.5, 219] and w.sum() == 1000
    assert V.bound_weights(np.arange(10), 10).tolist() == [1.0] * 10     # all T: the bound itself
    # the trapezoid rule is exact for L_t linear in t, and the estimate of a fast-falling L_t is close
    t = np.arange(1000)
    for L_t in (3.0 - 0.002 * t, 1.0 / (1 + t)):
        ts = V.strided_timesteps(1000, 100)
        assert abs((V.bound_weights(ts, 1000) * L_t[ts]).sum() - L_t.sum()) < 0.01 * L_t.sum()
    with pytest.raises(ValueError, match="rise strictly from 0 to T - 1"):
        V.bound_weights([0, 5], 10)


# ----------------------------------------------------------------------------- 4. bad input


def test_data_off_the_8bit_grid_is_refused_and_can_be_quantized():
    x = np.linspace(-1, 1, 7).reshape(1, 7)
    with pytest.raises(ValueError, match="8-bit data.*quantize_8bit"):
        LK.discretized_gaussian_log_likelihood(x, x, np.zeros_like(x))
    q = LK.quantize_8bit(x)
    LK.check_8bit(q)
    assert np.abs(q - x).max() <= 1 / 255 + 1e-12


def test_a_c_channel_output_for_a_learned_variance_is_one_clear_error():
    x = data8(np.random.default_rng(11), (2, 3, 2, 2))
    with pytest.raises(ValueError, match="2C = 6 channels .*learned_range"):
        V.vb_terms_bpd(SCHED, x, x, x, np.array([0, 1]), "learned_range")


def test_a_nan_term_is_caught_at_its_timestep():
    sched = S.make_schedule(20)
    x0 = data8(np.random.default_rng(12), (2, 1, 2, 2))

    def model(x, t, cond=None):
        return np.where(np.asarray(t)[:, None, None, None] == 13, np.nan, 0.0) + x

    with pytest.raises(V.BoundNotFinite, match="t = 13"):
        V.calc_bpd_loop(model, sched, x0)
