"""The sampling loop of the Karras-style samplers: Euler, Euler ancestral, Heun, DPM-Solver++(2M).

    x = init_noise_sigma z
    for i:  out = model_fn(scale_model_input(x, sigma_i), t_i, cond);  x = step(out, sigma_i, sigma_{i+1}, x, ...)

as diffusers' pipelines drive EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
HeunDiscreteScheduler (two model calls per step, the second at t_{i+1}, none after the last) and
DPMSolverMultistepScheduler. Every random draw can be passed in; the state a scheduler object would
keep (Heun's half-step, DPM-Solver++'s previous x0^) is a local variable here.

Shape legend: N batch, "..." the per-item dims; n = num_inference_steps; sigmas (n + 1,), ts (n,).
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy, xp_for
from .karras_samplers import (dpmsolver_pp_2m_step, euler_ancestral_step, euler_step, heun_step,
                              scale_model_input)
from .schedule import PREDICTION_TYPES, check_choice
from .sigmas import KARRAS_SAMPLERS, init_noise_sigma, make_sigmas


def _check_custom(timesteps, sigmas, T):
    """(ts (n,), sigmas (n + 1,)) as float64, or one line naming the bad argument."""
    ts, sg = np.asarray(timesteps, np.float64), np.asarray(sigmas, np.float64)
    if ts.ndim != 1 or ts.size == 0 or ts.min() < 0 or ts.max() > T - 1:
        raise ValueError(f"timesteps must be a non-empty 1-d list in [0, {T - 1}], got {ts.tolist()}")
    if sg.shape != (ts.size + 1,) or np.any(np.diff(sg[:-1]) >= 0) or sg[-1] < 0 or sg[-1] > sg[-2]:
        raise ValueError(f"sigmas must be descending, >= 0, one longer than timesteps ({ts.size + 1}), "
                         f"got {sg.tolist()}")
    return ts, sg


def sample_karras(model_fn, shape, schedule, sampler="euler", num_inference_steps=None, use_karras_sigmas=False,
                  timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", prediction_type="epsilon",
                  lower_order_final=True, clip_sample=False, clip_sample_range=1.0, cond=None, seed=0, device=None,
                  dtype=None, x_T=None, noises=None, timesteps=None, sigmas=None, return_trajectory=False,
                  callback=None, variance_type="fixed_small"):
    """Run sampler ('euler' | 'euler_a' | 'heun' | 'dpm++2m') from x = init_noise_sigma z to x_0.

    ts, sigmas = make_sigmas(schedule, n, sampler, use_karras_sigmas, timestep_spacing, steps_offset,
    final_sigmas_type) with n = num_inference_steps (default min(50, T)), or the given timesteps (n,) and
    sigmas (n + 1,) (both). model_fn(x_in (N, ...), t (N,), cond) -> model output; t is int64 when every
    timestep is a whole number, else float64 (Euler's 'linspace' and Karras timesteps are fractional).
    lower_order_final (dpm++2m): a first-order last step when n < 15 (diffusers' default True; with sigmas
    ending at 0 the last step is first order anyway).
    Random draws, all on the host in float64 from np.random.default_rng(seed): z (unless x_T, the
    N(0, I) draw, is given) then, for 'euler_a', one draw shaped `shape` per step with sigma_{i+1} > 0
    (noises (n, *shape) replaces them, entry i at step i). device, dtype: as sampler.sample.
    callback(i, t, x, pred_original_sample) runs after step i (after Heun's second model call).
    variance_type 'learned' | 'learned_range': the model outputs 2C channels and only the first C are used;
    these samplers take every noise level from sigmas, so the variance output goes unused (as in DDIM).
    Returns x_0 (*shape), or (x_0, trajectory) with trajectory = [x start, x after step 0, ..., x_0]."""
    check_choice("sampler", sampler, KARRAS_SAMPLERS)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    T = schedule.num_train_timesteps
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be (N, ...) with positive sizes, got {shape}")
    if (timesteps is None) != (sigmas is None):
        raise ValueError("pass timesteps and sigmas together (a custom schedule), or neither")
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or timesteps and sigmas, not both")
        ts, sg = _check_custom(timesteps, sigmas, T)
    else:
        n = num_inference_steps if num_inference_steps is not None else min(50, T)
        ts, sg = make_sigmas(schedule, n, sampler, use_karras_sigmas, timestep_spacing, steps_offset, final_sigmas_type)
    n = len(ts)
    if sampler == "heun" and sg[-1] != 0:
        raise ValueError(f"sigmas must end at 0 for sampler 'heun' (its second model call needs t_(i+1)), got {sg[-1]}")
    if noises is not None and len(noises) != n:
        raise ValueError(f"noises must have one entry per step: len {n}, got {len(noises)}")
    if device is None:
        device = "gpu" if x_T is not None and get_array_module(x_T) is not np else "cpu"
    xp = xp_for(device)
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype or (x_T.dtype if x_T is not None else np.float32))
    z = rng.standard_normal(shape) if x_T is None else x_T
    z = xp.asarray(to_numpy(z) if device == "cpu" else z, dtype=dtype)
    if tuple(z.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(z.shape)}")
    x = z * dtype.type(init_noise_sigma(sg, sampler, timestep_spacing))
    t_dtype = xp.int64 if np.all(ts == np.round(ts)) else xp.float64     # fractional t stays fractional
    learned = variance_type in ("learned", "learned_range") and len(shape) > 1
    kw = dict(prediction_type=prediction_type, clip_sample=clip_sample, clip_sample_range=clip_sample_range)

    def call(x, sigma, t):
        out = model_fn(scale_model_input(x, sigma, sampler), xp.full((shape[0],), t, dtype=t_dtype), cond)
        if learned:                              # (N, 2C, ...) -> the prediction's (N, C, ...); the variance unused
            if out.ndim != len(shape) or out.shape[1] != 2 * shape[1]:
                raise ValueError(f"model_output must have 2C = {2 * shape[1]} channels (axis 1) for variance_type "
                                 f"{variance_type!r}, got shape {tuple(out.shape)}")
            out = out[:, :shape[1]]
        return out

    trajectory = [x] if return_trajectory else None
    history = ()
    for i in range(n):
        t, sigma, sigma_next = ts[i], float(sg[i]), float(sg[i + 1])
        out = call(x, sigma, t)
        if sampler == "euler":
            x, x0 = euler_step(out, sigma, sigma_next, x, **kw)
        elif sampler == "euler_a":
            noise = None
            if sigma_next > 0:
                noise = rng.standard_normal(shape) if noises is None else noises[i]
                noise = xp.asarray(to_numpy(noise) if device == "cpu" else noise, dtype=dtype)
            x, x0 = euler_ancestral_step(out, sigma, sigma_next, x, noise, **kw)
        elif sampler == "heun":
            x, x0, half = heun_step(out, sigma, sigma_next, x, None, **kw)
            if sigma_next > 0:                                   # the second model call, at (x~, t_{i+1})
                x, x0, _ = heun_step(call(x, sigma_next, ts[i + 1]), sigma, sigma_next, x, half, **kw)
        else:
            lower = lower_order_final and n < 15 and i == n - 1
            x, x0, history = dpmsolver_pp_2m_step(out, sigma, sigma_next, x, history, lower_order=lower, **kw)
        if return_trajectory:
            trajectory.append(x)
        if callback is not None:
            callback(i, t, x, x0)
    return (x, trajectory) if return_trajectory else x
