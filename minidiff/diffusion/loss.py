"""The DDPM training objective (Algorithm 1) with its gradient, min-SNR-gamma weights, the hybrid loss
that learns the variance (Nichol & Dhariwal 2021), timestep sampling and condition dropout for CFG training.

    t ~ U{0, ..., T-1},  eps ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    L = mean_n  w_n * mean_d (model_output - target)^2

target by prediction_type: epsilon -> eps, sample -> x_0, v_prediction -> sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
Every random draw comes from an explicit host rng (np.random.Generator).

Shape legend: N batch, "..." per-item dims (C, H, W), D = their product; t: int or (N,).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from .schedule import PREDICTION_TYPES, add_noise, check_choice, check_same_shape, check_t, coef_like, from_x0_eps
from .vlb import LEARNED, split_model_output, vb_terms_bpd


def _check_rng(rng):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a np.random.Generator (np.random.default_rng(seed)), got {type(rng).__name__}")


def min_snr_weights(schedule, t, prediction_type="epsilon", snr_gamma=None):
    """Min-SNR-gamma loss weights (Hang et al. 2023; diffusers' train_text_to_image), snr = abar/(1 - abar):
    epsilon: min(snr, g) / snr  (1 where snr = 0, its limit);  sample: min(snr, g);
    v_prediction: min(snr, g) / (snr + 1).  snr_gamma None or 0: all weights 1.
    Returns host float64 weights of t's shape, () or (N,)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    t = check_t("t", t, schedule.num_train_timesteps)
    if snr_gamma is None or snr_gamma == 0:
        return np.ones(t.shape)
    if not snr_gamma > 0:
        raise ValueError(f"snr_gamma must be > 0 (or None / 0 for no weighting), got {snr_gamma!r}")
    snr = schedule.snr[t]
    clipped = np.minimum(snr, snr_gamma)
    if prediction_type == "epsilon":
        return np.where(snr > 0, clipped / np.where(snr > 0, snr, 1.0), 1.0)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(schedule, model_output, x0, noise, t, prediction_type="epsilon", snr_gamma=None):
    """L = mean_n w_n mean_d (out - target)^2  and  dL/dout = 2 w_n (out - target) / (N D)   (DDPM Alg. 1, line 5)

    model_output, x0, noise: (N, ...); t: (N,) or one int. With snr_gamma None every w_n = 1 and L is
    diffusers' F.mse_loss(model_output, target). Returns (loss, dmodel_output): a 0-d array in
    model_output's dtype and backend, and an array shaped like model_output."""
    check_same_shape(model_output=model_output, x0=x0, noise=noise)
    target = from_x0_eps(schedule, x0, noise, t, prediction_type)
    w = coef_like(min_snr_weights(schedule, t, prediction_type, snr_gamma), model_output)   # () or (N, 1, ...)
    diff = model_output - target
    loss = (w * diff * diff).mean()                         # = mean_n w_n mean_d diff^2 (equal D per item)
    # backward of: loss = mean(w * diff^2)  ->  dL/ddiff = 2 w diff / size;  ddiff/dout = 1
    dmodel_output = (2.0 / diff.size) * w * diff
    return loss, dmodel_output.astype(model_output.dtype, copy=False)


def hybrid_loss(schedule, model_output, x0, noise, t, variance_type="learned_range", prediction_type="epsilon",
                vlb_weight=0.001, snr_gamma=None):
    """L_hybrid = L_simple + lambda L_vlb,  L_vlb ~ T mean_n L_t(n)   (Nichol & Dhariwal 2021, sec. 3.1)

    L_simple is diffusion_loss on the first C channels (the mean output); L_t is vlb.vb_terms_bpd in bits/dim
    with the mean output stop-gradiented, so L_vlb trains only the variance output v (the last C channels).
    T L_t is the one-sample estimate of sum_t L_t for t ~ U{0..T-1}: improved-diffusion's RESCALED_MSE loss is
    lambda = 0.001. model_output: (N, 2C, ...); x0, noise: (N, C, ...); t: (N,).
    Returns (loss 0-d, dmodel_output (N, 2C, ...)): [dL_simple/dmean, lambda T / N dL_t/dv]."""
    check_choice("variance_type", variance_type, LEARNED)
    x_t = add_noise(schedule, x0, noise, t)
    mean_out, _ = split_model_output(model_output, x_t, variance_type)
    simple, dmean = diffusion_loss(schedule, mean_out, x0, noise, t, prediction_type, snr_gamma)
    # forward: vb = vb_terms_bpd(cat(stop_gradient(mean_out), v)); the 8-bit check (a host sync) is the loader's job
    vb = vb_terms_bpd(schedule, model_output, x0, x_t, t, variance_type, prediction_type, clip_denoised=False,
                      check=False, with_grad=True)
    scale = vlb_weight * schedule.num_train_timesteps
    loss = simple + scale * vb["output"].mean()
    # backward of: loss = simple + scale mean_n vb_n  ->  d/dv = scale / N dvb_n/dv;  d/dmean = dsimple/dmean
    dvar = (scale / x0.shape[0]) * vb["dvar"]
    xp = get_array_module(model_output)
    return loss.astype(model_output.dtype), xp.concatenate([dmean, dvar.astype(model_output.dtype)], axis=1)


def sample_timesteps(rng, n: int, num_train_timesteps: int) -> np.ndarray:
    """t_i ~ U{0, ..., T-1}, i = 1..n, drawn from the host rng (like torch.randint(0, T, (n,))).
    Returns int64 (n,) on the host; move it with backend.to_device if needed."""
    _check_rng(rng)
    if n < 1 or num_train_timesteps < 1:
        raise ValueError(f"n and num_train_timesteps must be >= 1, got n={n}, "
                         f"num_train_timesteps={num_train_timesteps}")
    return rng.integers(0, num_train_timesteps, size=n, dtype=np.int64)


def drop_condition(rng, cond, null_cond, p_uncond: float = 0.1):
    """Condition dropout for classifier-free guidance training (Ho & Salimans 2022, Algorithm 1):
    each item's condition is replaced by the null condition with probability p_uncond.

    cond: (N, ...) labels or embeddings (NumPy or CuPy); null_cond: one entry (shape cond.shape[1:])
    or a scalar (e.g. the null class id), broadcast to the dropped rows. The Bernoulli draws
    u_i ~ U[0, 1), dropped_i = u_i < p_uncond, come from the host rng.
    Returns (dropped, cond_out): a bool (N,) mask and the new conditions, both on cond's backend."""
    _check_rng(rng)
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must be in [0, 1], got {p_uncond!r}")
    xp = get_array_module(cond)
    cond = xp.asarray(cond)
    if cond.ndim < 1:
        raise ValueError(f"cond must have shape (N, ...), got a scalar of shape {tuple(cond.shape)}")
    null = xp.asarray(null_cond, dtype=cond.dtype)
    if null.ndim > 0 and tuple(null.shape) != tuple(cond.shape[1:]):
        raise ValueError(f"null_cond must be a scalar or have shape cond.shape[1:] = {tuple(cond.shape[1:])}, "
                         f"got {tuple(null.shape)}")
    dropped = xp.asarray(rng.random(cond.shape[0]) < p_uncond)
    mask = dropped.reshape((-1,) + (1,) * (cond.ndim - 1))
    return dropped, xp.where(mask, null, cond)
