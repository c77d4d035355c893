"""The score view: a denoiser's output is the score grad_x log p(x) of the noisy data, up to a scale.

Variance-preserving (VP, DDPM) coordinates:     x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
Variance-exploding (VE, Karras et al. 2022):    x   = x_t / sqrt(abar_t) = x_0 + sigma_t eps,
                                                sigma_t = sqrt((1 - abar_t) / abar_t)
Tweedie's formula ties the best noise prediction to the score of the noisy marginal p_t:
    grad_{x_t} log p_t(x_t) = -E[eps | x_t] / sqrt(1 - abar_t)          (VP)
    grad_x log p_sigma(x)   = (D(x; sigma) - x) / sigma^2,  D = E[x_0 | x]   (VE, the same statement)
and the probability-flow ODE (Song et al. 2021, eq. 13) in Karras et al.'s form (their eq. 4 with
sigma(t) = t, s(t) = 1) is dx / dsigma = -sigma grad_x log p_sigma(x) = (x - D(x; sigma)) / sigma.
The Euler, Heun and DPM-Solver++ samplers (karras_samplers.py) integrate that ODE.

Shape legend: N batch, "..." the per-item dims (C, H, W for images). sigma, abar: one float (host).
"""

from __future__ import annotations

import numpy as np

from .schedule import PREDICTION_TYPES, check_choice, check_same_shape, coef_like, to_x0_eps


def sigma_from_alphas_cumprod(alphas_cumprod):
    """sigma_t = sqrt((1 - abar_t) / abar_t)        (the VE noise level of x_t; Karras et al. 2022, Table 1)"""
    abar = np.asarray(alphas_cumprod, np.float64)
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - abar) / abar)


def alphas_cumprod_from_sigma(sigma):
    """abar = 1 / (1 + sigma^2)        (the inverse of sigma_from_alphas_cumprod)"""
    return 1.0 / (1.0 + np.asarray(sigma, np.float64) ** 2)


def vp_to_ve(x_t, sigma):
    """x = sqrt(1 + sigma^2) x_t = x_t / sqrt(abar)        (VP sample -> VE sample; x_t (N, ...))"""
    return x_t * coef_like(np.sqrt(1.0 + float(sigma) ** 2), x_t)


def ve_to_vp(x, sigma):
    """x_t = x / sqrt(1 + sigma^2) = sqrt(abar) x        (VE sample -> the model's input: scale_model_input)"""
    return x / coef_like(np.sqrt(1.0 + float(sigma) ** 2), x)


def score_from_eps(eps, alphas_cumprod):
    """grad_{x_t} log p_t(x_t) = -eps / sqrt(1 - abar_t)        (Tweedie; eps the model's E[eps | x_t])"""
    return eps * coef_like(-1.0 / np.sqrt(1.0 - float(alphas_cumprod)), eps)


def score(schedule, model_output, x_t, t, prediction_type="epsilon"):
    """grad_{x_t} log p_t(x_t) = -eps^ / sqrt(1 - abar_t), eps^ from any prediction type (schedule.to_x0_eps)
    x_t, model_output: (N, ...); t: one int or (N,). Returns the score (N, ...)."""
    _, eps = to_x0_eps(schedule, model_output, x_t, t, prediction_type)
    return eps * coef_like(-1.0 / schedule.sqrt_one_minus_alphas_cumprod[np.asarray(t)], x_t)


def denoised(model_output, x, sigma, prediction_type="epsilon"):
    """D(x; sigma) = x0^ from the model output at the VE sample x (the model saw x / sqrt(1 + sigma^2)):

    epsilon:       D = x - sigma eps
    v_prediction:  D = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) v
    sample:        D = the output itself
    (diffusers' pred_original_sample in Euler / Heun.) x, model_output: (N, ...). Returns D (N, ...)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_same_shape(model_output=model_output, x=x)
    s = float(sigma)
    if prediction_type == "epsilon":
        return x - coef_like(s, x) * model_output
    if prediction_type == "v_prediction":
        return model_output * coef_like(-s / (s**2 + 1) ** 0.5, x) + x / coef_like(s**2 + 1, x)
    return model_output


def score_ve(x, x0, sigma):
    """grad_x log p_sigma(x) = (D(x; sigma) - x) / sigma^2        (Tweedie, VE; x0 = D(x; sigma), (N, ...))"""
    return (x0 - x) / coef_like(float(sigma) ** 2, x)


def pf_ode_derivative(x, x0, sigma):
    """dx/dsigma = (x - D(x; sigma)) / sigma = -sigma grad_x log p_sigma(x)   (Karras et al. 2022, eq. 4; Alg. 1 line 4)
    x, x0 = D(x; sigma): (N, ...); sigma > 0. Returns d (N, ...)."""
    return (x - x0) / coef_like(float(sigma), x)
