"""DDPM and DDIM reverse steps with diffusion/sampler.py's signatures, one CUDA kernel per step on CuPy.

On CuPy, for a step with one timestep for the whole batch (as sample()'s loop makes it), one dtype
and a fixed variance, the coefficients are computed on the host in float64 as the reference step
computes them (its line 1), and the rest of the step (x0^, the clip, the update, the noise) runs as
one kernel, fast/cuda/sampler.py, which rounds every operation as the array ops do: the same numbers
bit for bit (tests/fast/test_sampler.py on the fake CuPy, tests/test_gpu_parity.py on a GPU).
Everything else (NumPy, a timestep per item, the learned variances) calls the reference step.

    DDPM, epsilon (the default)  8 array ops (6 at t = 0) in the reference, 1 launch here
    DDIM, epsilon, eta = 0        6 array ops (8 with eta > 0) in the reference, 1 launch here

Shape legend: N batch, C channels, "..." the remaining per-item dims; model_output, sample and
noise are (N, C, ...); t, prev_t: one int for the kernel path.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module
from ..diffusion import sampler as reference
from ..diffusion.schedule import PREDICTION_TYPES, check_same_shape, check_t
from .cuda.sampler import reverse_step_cuda

FIXED_VARIANCES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


def _one_kernel(schedule, variance_type, prediction_type, t, prev_t, model_output, sample) -> bool:
    """The kernel's case, before any check: CuPy, one timestep for the whole batch, a fixed variance, and the
    float64 schedule arithmetic (make_schedule(schedule_dtype="float32"), diffusers' float32 coefficients for
    oracle use, rounds its host arithmetic as diffusers does: that mode runs the reference step)."""
    return (get_array_module(model_output, sample) is not np and np.ndim(t) == 0 and np.ndim(prev_t) == 0
            and variance_type in FIXED_VARIANCES and prediction_type in PREDICTION_TYPES
            and getattr(schedule, "schedule_dtype", "float64") == "float64")


def _checked(schedule, model_output, t, prev_t, sample):
    """The reference step's checks of the arrays and timesteps; returns t, prev_t as host int64 ()."""
    check_same_shape(model_output=model_output, sample=sample)
    T = schedule.num_train_timesteps
    t = check_t("t", t, T, sample)
    return t, reference._check_prev(prev_t, t, T, sample)


def ddpm_step(schedule, model_output, t, prev_t, sample, noise, variance_type="fixed_small",
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0):
    """diffusion.sampler.ddpm_step (DDPM Alg. 2); on CuPy with one t and a fixed variance, in one kernel."""
    args = (schedule, model_output, t, prev_t, sample, noise, variance_type, prediction_type, clip_sample,
            clip_sample_range)
    if not _one_kernel(schedule, variance_type, prediction_type, t, prev_t, model_output, sample):
        return reference.ddpm_step(*args)
    t, prev_t = _checked(schedule, model_output, t, prev_t, sample)
    noisy = bool(t > 0)
    if noisy:
        if noise is None:
            raise ValueError("noise is required when some t > 0 (pass an array shaped like sample)")
        check_same_shape(noise=noise, sample=sample)
    if len({a.dtype for a in (model_output, sample) + ((noise,) if noisy else ())}) > 1:
        return reference.ddpm_step(*args)  # the kernel takes one dtype
    # 1. alphas, betas of this (possibly skipping) step: the reference's line 1
    a_t, a_prev = schedule.alphas_cumprod[t], reference._abar_prev(schedule, prev_t, 1.0)
    b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
    alpha_t = a_t / a_prev
    beta_t = 1.0 - alpha_t
    c_x0, c_xt = a_prev**0.5 * beta_t / b_t, alpha_t**0.5 * b_prev / b_t  # mu~ = c_x0 x0^ + c_xt x_t
    std = reference.ddpm_std(schedule, t, prev_t, variance_type) if noisy else 0.0
    # 2-6. x0^, clipped, mu~ and + sigma_t z, in one kernel
    return reverse_step_cuda(get_array_module(sample), model_output, sample, noise if noisy else None,
                             abar_t=a_t, prediction_type=prediction_type,
                             clip_range=clip_sample_range if clip_sample else None,
                             k0=c_x0, k1=c_xt, use_eps=False, noise_std=std)


def ddim_step(schedule, model_output, t, prev_t, sample, eta=0.0, noise=None, set_alpha_to_one=True,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, use_clipped_model_output=False):
    """diffusion.sampler.ddim_step (DDIM eq. 12); on CuPy with one t, in one kernel."""
    args = (schedule, model_output, t, prev_t, sample, eta, noise, set_alpha_to_one, prediction_type, clip_sample,
            clip_sample_range, use_clipped_model_output)
    if not float(eta) >= 0 or not _one_kernel(schedule, "fixed_small", prediction_type, t, prev_t,
                                              model_output, sample):
        return reference.ddim_step(*args)  # (which raises on a negative eta)
    t, prev_t = _checked(schedule, model_output, t, prev_t, sample)
    # 1. alphas of this (possibly skipping) step and sigma_t (DDIM eq. 16): the reference's line 1
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]
    a_t, a_prev = schedule.alphas_cumprod[t], reference._abar_prev(schedule, prev_t, final)
    b_t = 1.0 - a_t
    variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)
    std = eta * variance**0.5
    dir2 = 1.0 - a_prev - std**2
    if np.any(dir2 < -1e-12):
        raise ValueError(f"eta = {eta} is too large here: 1 - abar_prev - sigma_t^2 = {np.min(dir2):.3g} < 0")
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (pass an array shaped like sample)")
        check_same_shape(noise=noise, sample=sample)
    if len({a.dtype for a in (model_output, sample) + ((noise,) if eta > 0 else ())}) > 1:
        return reference.ddim_step(*args)  # the kernel takes one dtype
    c_x0, c_eps = a_prev**0.5, np.maximum(dir2, 0.0) ** 0.5  # x_prev = c_x0 x0^ + c_eps eps^ + sigma z
    # 2-4. x0^ and eps^, clipped, eps^ recomputed if asked, x_prev, in one kernel
    return reverse_step_cuda(get_array_module(sample), model_output, sample, noise if eta > 0 else None,
                             abar_t=a_t, prediction_type=prediction_type,
                             clip_range=clip_sample_range if clip_sample else None, k0=c_x0, k1=c_eps,
                             use_eps=True, recompute_eps=use_clipped_model_output, noise_std=std)
