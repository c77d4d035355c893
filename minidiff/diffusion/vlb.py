"""The variational bound of DDPM in bits per dimension (Ho et al. 2020, eq. 5; Nichol & Dhariwal 2021, sec. 2):

    -log p(x_0) <= L_vlb = L_T + sum_{t=1}^{T-1} L_t + L_0                       (here t is 0-based, below)
    L_T  = KL(q(x_T | x_0) || N(0, I))                                          prior_bpd
    L_t  = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   for t >= 1             vb_terms_bpd
    L_0  = -log p(x_0 | x_1), the discretized Gaussian decoder                   vb_terms_bpd at t = 0

With 0-based t (t = 0 is the paper's t = 1), vb_terms_bpd(t) is the decoder at t = 0 and the KL to the
posterior at x_{t-1} otherwise; calc_bpd_loop adds all T of them and the prior. Every term is a mean over
the D = C H W dims of an item, divided by ln 2: bits/dim. The formulas and their conventions are
improved-diffusion's (_vb_terms_bpd, _prior_bpd, calc_bpd_loop, p_mean_variance), in the input's dtype:
its log variances are clipped (posterior_log_variance_clipped: beta~_0 = 0 replaced by beta~_1, and the
same beta~_1 for fixed_large at t = 0), unlike the sampler's diffusers-style 1e-20 floor, which only
differs at t = 0 where the sampler adds no noise.

Shape legend: N batch, C channels, "..." per-item dims, D their product with C; T = num_train_timesteps.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module, to_numpy
from .likelihood import (discretized_gaussian_log_likelihood_dlogscale, gaussian_log_likelihood,
                         gaussian_log_likelihood_dlogscale, normal_kl, normal_kl_dlogvar2)
from .sampler import learned_range_log_variance
from .schedule import PREDICTION_TYPES, add_noise, check_choice, check_t, coef_like, to_x0_eps

VLB_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned", "learned_range")
LEARNED = ("learned", "learned_range")
DECODERS = ("discretized", "continuous")
LN2 = math.log(2.0)


class BoundNotFinite(RuntimeError):
    """A term of the bound is NaN or inf; the message names the timestep."""


def mean_flat(x):
    """mean over every axis but the first: (N, ...) -> (N,)."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def q_posterior_mean(schedule, x0, x_t, t):
    """mu~_t(x_t, x_0) = beta_t sqrt(abar_{t-1}) / (1 - abar_t) x_0 + (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) x_t
    (DDPM eq. 7; its variance is beta~_t, posterior_log_variance_clipped). x0, x_t: (N, ...). Returns (N, ...)."""
    t = check_t("t", t, schedule.num_train_timesteps, x_t)
    c1, c2 = coef_like(schedule.posterior_mean_coef1[t], x_t), coef_like(schedule.posterior_mean_coef2[t], x_t)
    return c1 * x0 + c2 * x_t


def split_model_output(model_output, x_t, variance_type):
    """(mean part (N, C, ...), variance part (N, C, ...) or None): learned types have 2C channels, the last C
    the variance (as diffusers' and improved-diffusion's models output them)."""
    check_choice("variance_type", variance_type, VLB_VARIANCE_TYPES)
    if variance_type not in LEARNED:
        return model_output, None
    C = x_t.shape[1]
    if model_output.ndim != x_t.ndim or model_output.shape[1] != 2 * C:
        raise ValueError(f"model_output must have 2C = {2 * C} channels (axis 1) for variance_type {variance_type!r}"
                         f", got shape {tuple(model_output.shape)} (a model trained with C outputs has no variance)")
    return model_output[:, :C], model_output[:, C:]


def model_log_variance(schedule, t, variance_type, predicted_variance=None, like=None):
    """log sigma_t^2 of p(x_{t-1} | x_t), and d log sigma_t^2 / dv for the learned types (else None):

    fixed_small     log beta~_t, clipped (beta~_1 at t = 0)            (DDPM "sigma^2 = beta~")
    fixed_large     log beta_t, with beta~_1 at t = 0                   (DDPM "sigma^2 = beta"; better L_0)
    learned         log v, v the model's variance itself (diffusers' meaning; improved-diffusion's
                    LEARNED reads v as the log variance);  d/dv = 1 / v
    learned_range   f log beta_t + (1 - f) log beta~_t (clipped), f = (v + 1) / 2;
                    d/dv = (log beta_t - log beta~_t) / 2
    t: (N,) host ints; like: (N, ...) the sample. Returns (log_var, dlog_var): broadcastable against like."""
    check_choice("variance_type", variance_type, VLB_VARIANCE_TYPES)
    t = check_t("t", t, schedule.num_train_timesteps, like)
    if variance_type == "fixed_small":
        return coef_like(schedule.posterior_log_variance_clipped[t], like), None
    if variance_type == "fixed_large":
        large = np.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
        return coef_like(np.log(large)[t], like), None
    if predicted_variance is None:
        raise ValueError(f"variance_type {variance_type!r} needs predicted_variance (the model's extra C channels)")
    xp = get_array_module(predicted_variance)
    if variance_type == "learned":
        return xp.log(predicted_variance), 1.0 / predicted_variance
    min_log, max_log = schedule.posterior_log_variance_clipped[t], np.log(schedule.betas[t])
    log_var = learned_range_log_variance(predicted_variance, min_log, max_log, like)
    return log_var, coef_like((max_log - min_log) / 2, like) * xp.ones_like(predicted_variance)


def vb_terms_bpd(schedule, model_output, x0, x_t, t, variance_type="fixed_small", prediction_type="epsilon",
                 clip_denoised=False, decoder="discretized", check=True, with_grad=False):
    """L_t in bits/dim, per item:  KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / D ln 2  for t >= 1,
    -log p(x_0 | x_1) / D ln 2 at t = 0   (improved-diffusion's _vb_terms_bpd)

    p(x_{t-1} | x_t) = N(mu~_t(x_t, x0^), sigma_t^2): x0^ from the model's mean output (prediction_type,
    clipped to [-1, 1] if clip_denoised) and sigma_t^2 from model_log_variance. model_output: (N, C, ...), or
    (N, 2C, ...) for the learned types; x0, x_t: (N, C, ...); t: (N,) or one int. decoder 'discretized'
    (8-bit data, checked unless check=False) or 'continuous' (a Gaussian density, for continuous data).
    Returns dict(output (N,), pred_xstart (N, C, ...)) and, with_grad, 'dvar' = d output_n / d v (N, C, ...):
    the gradient reaches only the variance output v; the mean is held fixed (a stop-gradient)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_choice("decoder", decoder, DECODERS)
    mean_out, v = split_model_output(model_output, x_t, variance_type)
    t = check_t("t", t, schedule.num_train_timesteps, x_t)
    t = np.broadcast_to(t, (x_t.shape[0],))
    xp = get_array_module(x_t)
    pred_xstart, _ = to_x0_eps(schedule, mean_out, x_t, t, prediction_type)
    if clip_denoised:
        pred_xstart = xp.clip(pred_xstart, -1.0, 1.0)
    mean = q_posterior_mean(schedule, pred_xstart, x_t, t)                     # mean of p(x_{t-1} | x_t)
    log_var, dlog_var = model_log_variance(schedule, t, variance_type, v, like=x_t)
    log_var = log_var * xp.ones_like(x_t)                                      # fixed types: (N, 1, ...) -> (N, C, ...)
    true_mean = q_posterior_mean(schedule, x0, x_t, t)                         # q(x_{t-1} | x_t, x_0)
    true_log_var = coef_like(schedule.posterior_log_variance_clipped[t], x_t)
    kl = normal_kl(true_mean, true_log_var, mean, log_var)
    if decoder == "discretized":
        log_px, dlog_px = discretized_gaussian_log_likelihood_dlogscale(x0, mean, 0.5 * log_var, check)
    else:
        log_px, dlog_px = gaussian_log_likelihood(x0, mean, 0.5 * log_var), None
    first = coef_like((t == 0).astype(np.float64), x_t)                        # 1 where t = 0: the decoder term
    D = x_t[0].size                                                            # dims per item
    per_dim = first * -log_px + (1 - first) * kl                               # where(t == 0, decoder nll, kl)
    out = {"output": mean_flat(per_dim) / LN2, "pred_xstart": pred_xstart}
    if with_grad:
        if dlog_var is None:
            raise ValueError(f"with_grad needs a learned variance_type {LEARNED}, got {variance_type!r}")
        if dlog_px is None:
            dlog_px = gaussian_log_likelihood_dlogscale(x0, mean, 0.5 * log_var)
        # backward of: per_dim = where(t == 0, -log p(x0; mean, e^(log_var / 2)), KL(q || N(mean, e^log_var)))
        dper_dim_dlog_var = first * (-0.5 * dlog_px) + (1 - first) * normal_kl_dlogvar2(true_mean, true_log_var,
                                                                                          mean, log_var)
        out["dvar"] = dper_dim_dlog_var * dlog_var / (D * LN2)                 # output = mean_d(per_dim) / ln 2
    return out


def prior_bpd(schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) / D ln 2,  q(x_T | x_0) = N(sqrt(abar_{T-1}) x_0, (1 - abar_{T-1}) I)
    (improved-diffusion's _prior_bpd; it does not depend on the model). x0: (N, ...). Returns (N,)."""
    last = schedule.num_train_timesteps - 1
    mean = coef_like(schedule.sqrt_alphas_cumprod[last], x0) * x0
    log_var = coef_like(schedule.log_one_minus_alphas_cumprod[last], x0)
    return mean_flat(normal_kl(mean, log_var, 0.0, 0.0)) / LN2


def strided_timesteps(num_train_timesteps: int, n: int) -> np.ndarray:
    """About n timesteps {0, 1} + round((T - 1) s^2), s = linspace(0, 1, n): dense at small t, where L_t falls
    fastest (L_1 ~ 1 bit, L_100 ~ 0.01 for DDPM's schedule), for a strided estimate (see bound_weights)."""
    T = num_train_timesteps
    if not 3 <= n <= T:
        raise ValueError(f"the number of timesteps of a strided bound must be in [3, T = {T}], got {n}")
    return np.unique(np.concatenate([[0, 1], np.rint((T - 1) * np.linspace(0, 1, n) ** 2)])).astype(np.int64)


def bound_weights(timesteps, T: int) -> np.ndarray:
    """Weights w_k with sum_k w_k L_{t_k} ~ sum_t L_t for ascending timesteps 0 = t_0 < t_1 < ... = T - 1:
    w = 1 for the decoder t_0 = 0; the t >= 1 terms by the trapezoid rule over t in [1, T - 1],
    w_k = (t_{k+1} - t_{k-1}) / 2 inside, plus 1/2 at both ends (and t_1 - 1 below t_1). All T timesteps:
    every w = 1 and the sum is the bound itself; fewer: an estimate, not a bound."""
    ts = np.asarray(timesteps, np.int64)
    if ts.ndim != 1 or len(ts) < 2 or ts[0] != 0 or ts[-1] != T - 1 or np.any(np.diff(ts) <= 0):
        raise ValueError(f"timesteps must rise strictly from 0 to T - 1 = {T - 1}, got {ts.tolist()}")
    tk, w = ts[1:].astype(np.float64), np.zeros(len(ts) - 1)
    gaps = np.diff(tk)                                       # trapezoids between neighbouring evaluated t
    w[:-1] += gaps / 2
    w[1:] += gaps / 2
    w[0] += 0.5 + (tk[0] - 1)                                # the ends' half units, and t in [1, t_1)
    w[-1] += 0.5
    return np.concatenate([[1.0], w])


def calc_bpd_loop(model_fn, schedule, x0, cond=None, variance_type="fixed_small", prediction_type="epsilon",
                  clip_denoised=True, seed=0, noises=None, timesteps=None, decoder="discretized", callback=None):
    """The whole bound in bits/dim, L_T + sum_t L_t, per item (improved-diffusion's calc_bpd_loop):

    for t = T-1, ..., 0:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps_t;  vb[:, k] = L_t(model_fn(x_t, t, cond))
    total_bpd = prior_bpd + sum_k w_k vb[:, k]   (w = 1 for all T timesteps: bound_weights)

    model_fn(x_t, t (N,) int64, cond) -> model output, (N, C, ...) or (N, 2C, ...). x0: (N, C, ...).
    timesteps: None (all T: the bound) or ascending timesteps from 0 to T-1 (a strided estimate).
    Noise: eps_t drawn from np.random.default_rng(seed) on the host in float64 in loop order (descending t),
    or noises[k] (loop order). callback(k, t, vb_column) after each t. A NaN or inf term raises
    BoundNotFinite naming t. Returns dict(total_bpd (N,), prior_bpd (N,), vb (N, K), xstart_mse (N, K),
    mse (N, K), timesteps (K,), weights (K,)), columns in loop order (descending t), as improved-diffusion's."""
    T = schedule.num_train_timesteps
    ts = np.arange(T) if timesteps is None else check_t("timesteps", timesteps, T)
    weights = bound_weights(ts, T)[::-1]
    ts = ts[::-1].copy()
    if noises is not None and len(noises) != len(ts):
        raise ValueError(f"noises must hold one draw per timestep: {len(ts)}, got {len(noises)}")
    xp = get_array_module(x0)
    rng = np.random.default_rng(seed)
    N = x0.shape[0]
    vb, xstart_mse, mse = [], [], []
    for k, t in enumerate(ts.tolist()):
        eps = rng.standard_normal(x0.shape) if noises is None else to_numpy(noises[k])
        eps = xp.asarray(eps, dtype=x0.dtype)
        t_batch = np.full(N, t, np.int64)
        x_t = add_noise(schedule, x0, eps, t_batch)
        out = vb_terms_bpd(schedule, model_fn(x_t, xp.asarray(t_batch), cond), x0, x_t, t_batch, variance_type,
                           prediction_type, clip_denoised, decoder)
        column = out["output"]
        if not bool(xp.all(xp.isfinite(column))):
            raise BoundNotFinite(f"the bound's term L_t is {to_numpy(column).tolist()} at t = {t} "
                                 f"({'the decoder' if t == 0 else 'the KL to q(x_(t-1) | x_t, x_0)'})")
        vb.append(column)
        xstart_mse.append(mean_flat((out["pred_xstart"] - x0) ** 2))
        eps_hat = to_x0_eps(schedule, out["pred_xstart"], x_t, t_batch, "sample")[1]
        mse.append(mean_flat((eps_hat - eps) ** 2))
        if callback is not None:
            callback(k, t, column)
    vb, xstart_mse, mse = xp.stack(vb, axis=1), xp.stack(xstart_mse, axis=1), xp.stack(mse, axis=1)
    prior = prior_bpd(schedule, x0)
    total = prior + (vb * xp.asarray(weights.astype(x0.dtype))).sum(axis=1)
    return {"total_bpd": total, "prior_bpd": prior, "vb": vb, "xstart_mse": xstart_mse, "mse": mse,
            "timesteps": ts, "weights": weights}
