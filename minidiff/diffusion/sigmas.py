"""Noise levels of the Karras-style samplers, as diffusers' set_timesteps computes them for
EulerDiscreteScheduler ('euler'), EulerAncestralDiscreteScheduler ('euler_a'), HeunDiscreteScheduler
('heun') and DPMSolverMultistepScheduler ('dpm++2m').

A sampler visits n timesteps ts (descending; the model's t input) and n + 1 noise levels
sigmas (descending, sigmas[n] = 0 or sigma_min): step i goes from sigmas[i] to sigmas[i + 1].
sigma_t = sqrt((1 - abar_t) / abar_t) is the VE noise level of timestep t (score.py).
Everything is float64 on the host (diffusers keeps these in float32; docs/conventions.md).

Shape legend: T = num_train_timesteps, n = num_inference_steps; arrays are NumPy (n,) or (n + 1,).
"""

from __future__ import annotations

import numpy as np

from .schedule import check_choice
from .score import sigma_from_alphas_cumprod
from .timesteps import TIMESTEP_SPACINGS, _check_int, make_timesteps

KARRAS_SAMPLERS = ("euler", "euler_a", "heun", "dpm++2m")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ZERO_SNR_ALPHAS_CUMPROD = 2.0**-24  # diffusers' stand-in for abar_{T-1} = 0, so that sigma_{T-1} is finite


def training_sigmas(schedule) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), t = 0 .. T-1 (ascending); abar_{T-1} = 0 (zero SNR) becomes 2^-24."""
    abar = np.array(schedule.alphas_cumprod)
    abar[abar == 0] = ZERO_SNR_ALPHAS_CUMPROD
    return sigma_from_alphas_cumprod(abar)


def sigma_to_t(schedule, sigma) -> np.ndarray:
    """t(sigma) = interp(log sigma, log sigma_t, t), clamped to [0, T-1]        (diffusers' _sigma_to_t)
    sigma: float or array; sigma = 0 maps to t = 0. Returns float64 of sigma's shape."""
    log_sigmas = np.log(training_sigmas(schedule))
    log_sigma = np.log(np.maximum(np.asarray(sigma, np.float64), 1e-10))
    return np.interp(log_sigma, log_sigmas, np.arange(len(log_sigmas), dtype=np.float64))


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0 .. n-1
    (Karras et al. 2022, eq. 5; rho = 7). Returns (n,) descending from sigma_max to sigma_min."""
    ramp = np.linspace(0, 1, n)
    max_inv, min_inv = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho


def inference_timesteps(num_train_timesteps: int, num_inference_steps: int, sampler: str = "euler",
                        timestep_spacing: str = "linspace", steps_offset: int = 0) -> np.ndarray:
    """The n timesteps of each scheduler's set_timesteps (descending, float64):

    euler, euler_a, heun:  linspace  ts = linspace(0, T - 1, n)[::-1]   (not rounded: fractional t)
                           leading / trailing  as make_timesteps (timesteps.py)
    dpm++2m:               linspace  ts = round(linspace(0, T - 1, n + 1))[::-1][:n]
                           leading   ts = [k (T // (n + 1)) for k = n .. 1] + steps_offset
                           trailing  as make_timesteps"""
    check_choice("sampler", sampler, KARRAS_SAMPLERS)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int("num_inference_steps", num_inference_steps, 1, T)
    if sampler != "dpm++2m" or timestep_spacing == "trailing":
        if timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n)[::-1].copy()
        return make_timesteps(T, n, timestep_spacing, steps_offset).astype(np.float64)
    if timestep_spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
    ts = (np.arange(0, n + 1) * (T // (n + 1)))[::-1][:-1] + _check_int("steps_offset", steps_offset, 0)
    if ts[0] >= T:
        raise ValueError(f"steps_offset = {steps_offset} pushes the first timestep to {ts[0]} >= "
                         f"num_train_timesteps = {T}")
    return ts.astype(np.float64)


def make_sigmas(schedule, num_inference_steps: int, sampler: str = "euler", use_karras_sigmas: bool = False,
                timestep_spacing: str = "linspace", steps_offset: int = 0, final_sigmas_type: str = "zero"):
    """(timesteps (n,), sigmas (n + 1,)) of a Karras-style sampler, as diffusers' set_timesteps:

    sigmas = interp(ts, [0 .. T-1], sigma_t)                      (interpolation_type="linear")
    Karras (use_karras_sigmas): sigmas = karras_sigmas(sigmas[-1], sigmas[0], n),  ts = sigma_to_t(sigmas)
        (dpm++2m: from the whole training range, sigma_0 .. sigma_{T-1}, and ts rounded to integers)
    sigmas[n] = 0 (final_sigmas_type="zero") or sigma_0 ("sigma_min"; euler and dpm++2m only).
    'euler_a' has no Karras option in diffusers; here it takes the same sigmas as 'euler'."""
    check_choice("final_sigmas_type", final_sigmas_type, FINAL_SIGMAS_TYPES)
    if final_sigmas_type == "sigma_min" and sampler in ("euler_a", "heun"):
        raise ValueError(f"final_sigmas_type must be 'zero' for sampler {sampler!r} (diffusers ends it at 0)")
    T = schedule.num_train_timesteps
    ts = inference_timesteps(T, num_inference_steps, sampler, timestep_spacing, steps_offset)
    train = training_sigmas(schedule)
    sigmas = np.interp(ts, np.arange(T, dtype=np.float64), train)
    n = len(ts)
    if use_karras_sigmas:
        lo, hi = (train[0], train[-1]) if sampler == "dpm++2m" else (sigmas[-1], sigmas[0])
        sigmas = karras_sigmas(lo, hi, n)
        ts = sigma_to_t(schedule, sigmas)
        if sampler == "dpm++2m" and schedule.beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    sigmas = np.concatenate([sigmas, [0.0 if final_sigmas_type == "zero" else train[0]]])
    if np.any(np.diff(sigmas[:-1]) >= 0) or sigmas[-1] > sigmas[-2]:
        raise ValueError(f"num_inference_steps = {n} repeats a noise level for sampler {sampler!r} with "
                         f"timestep_spacing {timestep_spacing!r} (T = {T}); use fewer steps")
    return ts, sigmas


def init_noise_sigma(sigmas, sampler: str = "euler", timestep_spacing: str = "linspace") -> float:
    """The std of the starting sample x_T = init_noise_sigma z, z ~ N(0, I), as diffusers' schedulers:
    euler, euler_a, heun: max sigma ('linspace', 'trailing') or sqrt(max sigma^2 + 1) ('leading');
    dpm++2m: 1 (it works on the VP sample x_t, not on the VE x)."""
    check_choice("sampler", sampler, KARRAS_SAMPLERS)
    if sampler == "dpm++2m":
        return 1.0
    s = float(np.max(sigmas))
    return s if timestep_spacing in ("linspace", "trailing") else (s**2 + 1) ** 0.5
