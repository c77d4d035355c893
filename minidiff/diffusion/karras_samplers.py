"""Euler, Euler ancestral, Heun and DPM-Solver++(2M) steps on a sigma schedule (sigmas.py), as pure
functions in diffusers' conventions (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler, DPMSolverMultistepScheduler with algorithm_type="dpmsolver++", solver_order=2,
solver_type="midpoint").

The ODE they solve (score.py):  dx/dsigma = (x - D(x; sigma)) / sigma,  D = x0^ from the model output.
Euler, Euler ancestral and Heun step the VE sample x = x_t / sqrt(abar) and feed the model
scale_model_input(x) = x / sqrt(sigma^2 + 1); DPM-Solver++ steps the VP sample x_t itself.
Nothing is stored between calls: the random draw (noise), Heun's first half-step (HeunHalf) and
DPM-Solver++'s previous x0^ (history) go in and come back out. Coefficients are host float64,
cast to the sample's dtype; sigma and sigma_next are floats with 0 <= sigma_next <= sigma.

Shape legend: N batch, "..." the per-item dims (C, H, W for images); every array is (N, ...).
Not implemented: Euler's s_churn (stochastic Euler), DPM-Solver's dynamic thresholding (with
sample_max_value = 1 it is clip_sample here), the SDE and third-order DPM-Solver variants.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..backend import get_array_module
from .schedule import PREDICTION_TYPES, check_choice, check_same_shape, coef_like
from .score import denoised, pf_ode_derivative, ve_to_vp, vp_to_ve
from .sigmas import KARRAS_SAMPLERS


def _check_step(sigma, sigma_next, prediction_type, **arrays):
    """One line naming the argument: 0 <= sigma_next <= sigma, sigma > 0, a known prediction type, equal shapes."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if not (np.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite float > 0, got {sigma!r}")
    if not 0 <= sigma_next <= sigma:
        raise ValueError(f"sigma_next must be in [0, sigma = {sigma}], got {sigma_next!r}")
    check_same_shape(**arrays)


def _x0(model_output, x, sigma, prediction_type, clip_sample, clip_sample_range):
    """D(x; sigma), clipped to [-r, r] when clip_sample."""
    x0 = denoised(model_output, x, sigma, prediction_type)
    return get_array_module(x0).clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def scale_model_input(sample, sigma, sampler="euler"):
    """x_in = x / sqrt(sigma^2 + 1) (euler, euler_a, heun: the VP input of the VE x); x_in = x_t (dpm++2m)"""
    check_choice("sampler", sampler, KARRAS_SAMPLERS)
    return sample if sampler == "dpm++2m" else ve_to_vp(sample, sigma)


def euler_step(model_output, sigma, sigma_next, sample, prediction_type="epsilon", clip_sample=False,
               clip_sample_range=1.0):
    """x_next = x + (sigma_next - sigma) d,  d = (x - D(x; sigma)) / sigma   (Karras et al. 2022, Alg. 2, S_churn = 0)

    Returns (prev_sample, pred_original_sample), each (N, ...)."""
    _check_step(sigma, sigma_next, prediction_type, model_output=model_output, sample=sample)
    x0 = _x0(model_output, sample, sigma, prediction_type, clip_sample, clip_sample_range)
    d = pf_ode_derivative(sample, x0, sigma)
    return sample + d * coef_like(sigma_next - sigma, sample), x0


def ancestral_sigmas(sigma, sigma_next):
    """sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),  sigma_down = sqrt(sigma_next^2 - sigma_up^2)
    (k-diffusion get_ancestral_step, eta = 1): sigma_down^2 + sigma_up^2 = sigma_next^2. Returns two floats."""
    up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    return up, (sigma_next**2 - up**2) ** 0.5


def euler_ancestral_step(model_output, sigma, sigma_next, sample, noise, prediction_type="epsilon",
                         clip_sample=False, clip_sample_range=1.0):
    """x_next = x + (sigma_down - sigma) (x - D(x; sigma)) / sigma + sigma_up z    (Euler to sigma_down, then noise)

    noise z (N, ...) may be None only when sigma_next = 0 (sigma_up = 0, the last step).
    Returns (prev_sample, pred_original_sample)."""
    _check_step(sigma, sigma_next, prediction_type, model_output=model_output, sample=sample)
    up, down = ancestral_sigmas(float(sigma), float(sigma_next))
    if up > 0:
        if noise is None:
            raise ValueError("noise is required when sigma_next > 0 (pass an array shaped like sample)")
        check_same_shape(noise=noise, sample=sample)
    x0 = _x0(model_output, sample, sigma, prediction_type, clip_sample, clip_sample_range)
    d = pf_ode_derivative(sample, x0, sigma)
    prev = sample + d * coef_like(down - sigma, sample)
    return (prev + noise * coef_like(up, sample) if up > 0 else prev), x0


class HeunHalf(NamedTuple):
    """Heun's first half-step, passed from the first call of heun_step to the second."""
    derivative: object  # d = (x - D(x; sigma)) / sigma at the start, (N, ...)
    dt: float           # sigma_next - sigma
    sample: object      # x at the start, (N, ...)


def heun_step(model_output, sigma, sigma_next, sample, first_half=None, prediction_type="epsilon",
              clip_sample=False, clip_sample_range=1.0):
    """x_next = x + (sigma_next - sigma) (d + d') / 2,  d' = (x~ - D(x~; sigma_next)) / sigma_next   (Karras Alg. 1)

    Two calls per step (diffusers' first / second order states):
      first_half=None: model_output at (x, sigma) -> (x~ = x + (sigma_next - sigma) d, x0^, HeunHalf)
      first_half=h:    model_output at (x~ = sample, sigma_next) -> (x_next, x0^, None)
    With sigma_next = 0 the first call's Euler step x~ is the step's result (no second call).
    Returns (sample, pred_original_sample, first_half or None)."""
    _check_step(sigma, sigma_next, prediction_type, model_output=model_output, sample=sample)
    if first_half is None:
        x0 = _x0(model_output, sample, sigma, prediction_type, clip_sample, clip_sample_range)
        d = pf_ode_derivative(sample, x0, sigma)
        dt = float(sigma_next) - float(sigma)
        return sample + d * coef_like(dt, sample), x0, HeunHalf(d, dt, sample)
    if not isinstance(first_half, HeunHalf):
        raise ValueError(f"first_half must be the HeunHalf returned by the first call, got {type(first_half).__name__}")
    if sigma_next == 0:
        raise ValueError("heun_step: no second half-step when sigma_next = 0 (the first call's Euler step is final)")
    check_same_shape(sample=sample, **{"first_half.sample": first_half.sample})
    x0 = _x0(model_output, sample, sigma_next, prediction_type, clip_sample, clip_sample_range)
    d2 = pf_ode_derivative(sample, x0, sigma_next)
    d = (first_half.derivative + d2) / 2
    return first_half.sample + d * coef_like(first_half.dt, sample), x0, None


def dpmsolver_pp_2m_step(model_output, sigma, sigma_next, sample, history=(), prediction_type="epsilon",
                         lower_order=False, clip_sample=False, clip_sample_range=1.0):
    """x_next = (s_next / s) x_t - a_next (e^-h - 1) (D0 + D1 / 2)   (DPM-Solver++(2M), Lu et al. 2022, Alg. 2)

    a = 1 / sqrt(1 + sigma^2), s = sigma a (the VP alpha_t, sigma_t), lambda = log(a / s) = -log sigma,
    h = lambda_next - lambda, D0 = x0^, D1 = (h / h_prev) (x0^ - x0^_prev), h_prev = lambda - lambda_prev.
    First order (D1 = 0; DDIM's step) when history is empty, lower_order (diffusers' lower_order_final)
    or sigma_next = 0 (final_sigmas_type="zero": then x_next = x0^).
    sample: the VP x_t (N, ...). history: () or ((sigma_prev, x0_prev),), the previous step's x0^.
    Returns (prev_sample, pred_original_sample, ((sigma, x0^),)), the history for the next step."""
    _check_step(sigma, sigma_next, prediction_type, model_output=model_output, sample=sample)
    if not isinstance(history, (tuple, list)) or len(history) > 1 or any(len(h) != 2 for h in history):
        raise ValueError("history must be () or ((sigma_prev, x0_prev),) as returned by the previous step")
    if history:
        sigma_prev, x0_prev = history[0]
        if tuple(x0_prev.shape) != tuple(sample.shape) or not float(sigma_prev) > float(sigma):
            raise ValueError(f"history must hold (sigma_prev > sigma = {sigma}, x0_prev shaped {tuple(sample.shape)}), "
                             f"got sigma_prev = {sigma_prev}, shape {tuple(x0_prev.shape)}")
    x0 = _x0(model_output, vp_to_ve(sample, sigma), sigma, prediction_type, clip_sample, clip_sample_range)
    a_next, s_next = 1 / (1 + sigma_next**2) ** 0.5, sigma_next / (1 + sigma_next**2) ** 0.5
    s_now = sigma / (1 + sigma**2) ** 0.5
    if sigma_next == 0:                                           # h = inf: x_next = x0^
        return x0, x0, ((float(sigma), x0),)
    h = np.log(sigma) - np.log(sigma_next)                        # lambda_next - lambda
    c_x, c_d = s_next / s_now, -a_next * np.expm1(-h)             # x_next = c_x x_t + c_d (D0 + D1 / 2)
    D = x0
    if history and not lower_order:
        h_prev = np.log(sigma_prev) - np.log(sigma)
        D = x0 + (x0 - x0_prev) * coef_like(0.5 * h / h_prev, sample)
    return sample * coef_like(c_x, sample) + D * coef_like(c_d, sample), x0, ((float(sigma), x0),)
