"""DDPM and DDIM reverse steps and the sampling loop, in diffusers' conventions.

Every step takes the previous timestep explicitly: prev_t = -1 means "before the start"
(abar_prev = 1 for DDPM, final_alpha_cumprod for DDIM). Skipped steps use the per-step
alpha_t' = abar_t / abar_prev, never alphas[t]. Coefficients are computed in float64 on the
host and cast to the sample's dtype and backend; every random draw can be passed in.

Shape legend: N batch, C channels, "..." the remaining per-item dims (H, W for images);
T = num_train_timesteps; n = num_inference_steps. t, prev_t: one int or an int array (N,).
Dynamic thresholding (diffusers' `thresholding=True`) is not implemented.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy, xp_for
from .schedule import PREDICTION_TYPES, check_choice, check_same_shape, check_t, coef_like, to_x0_eps
from .karras_sampling import sample_karras
from .sigmas import KARRAS_SAMPLERS
from .timesteps import check_timestep_list, make_timesteps
from .timesteps import prev_timesteps as next_entry_prev_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
SAMPLERS = ("ddpm", "ddim") + KARRAS_SAMPLERS  # the last four: karras_sampling.sample_karras


def _abar_prev(schedule, prev_t, final):
    """abar at prev_t (host float64), with `final` where prev_t = -1."""
    return np.where(prev_t >= 0, schedule.alphas_cumprod[np.maximum(prev_t, 0)], final)


def _host(schedule, *values):
    """Host coefficients in the schedule's arithmetic dtype: float32 when make_schedule(schedule_dtype="float32")
    (diffusers computes 1 - abar_t / abar_prev etc. on 0-d float32 tensors), float64 otherwise."""
    dtype = np.float32 if getattr(schedule, "schedule_dtype", "float64") == "float32" else np.float64
    return tuple(np.asarray(v).astype(dtype) for v in values)


def _check_prev(prev_t, t, T, x):
    """prev_t < t elementwise; any negative prev_t means "before the start" and becomes -1 (as in DDIMScheduler,
    whose raw t - T // n may be -10). Returns it as a host int64 array."""
    host = to_numpy(prev_t)
    prev_t = check_t("prev_t", np.maximum(host, -1) if np.issubdtype(host.dtype, np.integer) else host, T, x, low=-1)
    if np.any(prev_t >= t):
        raise ValueError(f"prev_t must be < t elementwise (a negative prev_t means before the start), "
                         f"got prev_t = {prev_t.tolist()}, t = {t.tolist()}")
    return prev_t


def ddpm_std(schedule, t, prev_t, variance_type="fixed_small", predicted_variance=None, like=None):
    """sigma_t, the standard deviation of the DDPM step t -> prev_t (diffusers' _get_variance + step):

    beta_t' = 1 - abar_t / abar_prev;  beta~_t = max((1 - abar_prev) / (1 - abar_t) beta_t', 1e-20)
    fixed_small      sigma = sqrt(beta~_t)                   (DDPM "sigma^2 = beta~")
    fixed_small_log  sigma = exp(log(beta~_t) / 2)           (the same value, via the log)
    fixed_large      sigma = sqrt(beta_t')                    (DDPM "sigma^2 = beta", unclamped)
    fixed_large_log  sigma = exp(log(beta_t') / 2)            (GLIDE; diffusers' step takes sqrt of the
                                                              log here and returns NaN; we don't)
    learned          sigma = sqrt(v), v = predicted_variance (the model's variance itself)
    learned_range    sigma = exp((f log beta_t' + (1 - f) log beta~_t) / 2), f = (v + 1) / 2
                                                             (Nichol & Dhariwal 2021, eq. 15)
    Returns values broadcastable against the sample `like` (N, ...) (fixed types: a scalar or (N, 1, ...);
    learned types: the shape of predicted_variance). With like=None the fixed types return the
    host float64 values, shape () or (N,)."""
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    T = schedule.num_train_timesteps
    t = check_t("t", t, T, like)
    prev_t = _check_prev(prev_t, t, T, like)
    a_t, a_prev = _host(schedule, schedule.alphas_cumprod[t], _abar_prev(schedule, prev_t, 1.0))
    beta_t = 1.0 - a_t / a_prev                                         # current_beta_t
    var = np.maximum((1.0 - a_prev) / (1.0 - a_t) * beta_t, 1e-20)     # beta~_t, floored as in diffusers
    if variance_type in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
        std = np.sqrt(var) if variance_type.startswith("fixed_small") else np.sqrt(beta_t)
        return std if like is None else coef_like(std, like)
    if predicted_variance is None:
        raise ValueError(f"variance_type {variance_type!r} needs predicted_variance (the model's extra C channels)")
    xp = get_array_module(predicted_variance)
    like = predicted_variance if like is None else like
    if variance_type == "learned":
        return xp.sqrt(predicted_variance)
    return xp.exp(0.5 * learned_range_log_variance(predicted_variance, np.log(var), np.log(beta_t), like))


def learned_range_log_variance(predicted_variance, min_log, max_log, like):
    """log sigma^2 = f max_log + (1 - f) min_log,  f = (v + 1) / 2    (Nichol & Dhariwal 2021, eq. 15)

    v = predicted_variance (N, C, ...), in [-1, 1] for [min, max]; min_log, max_log: host float64 () or (N,),
    log beta~_t and log beta_t; like: the sample whose dtype and backend they take. d log sigma^2 / dv =
    (max_log - min_log) / 2. Returns (N, C, ...). (vlb.py trains v through this same line.)"""
    frac = (predicted_variance + 1) / 2
    return frac * coef_like(max_log, like) + (1 - frac) * coef_like(min_log, like)


def ddpm_step(schedule, model_output, t, prev_t, sample, noise, variance_type="fixed_small",
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0):
    """One ancestral step x_t -> x_prev of DDPM (Ho et al. 2020, eqs. 6-7, Algorithm 2):

    x0^  = to_x0_eps(model_output)[0], clipped to [-r, r] if clip_sample
    mu   = sqrt(abar_prev) beta_t' / (1 - abar_t) x0^ + sqrt(alpha_t') (1 - abar_prev) / (1 - abar_t) x_t
    x_prev = mu + sigma_t z  for items with t > 0 (no noise at t = 0);  alpha_t' = abar_t / abar_prev

    model_output: (N, C, ...), or (N, 2C, ...) for the learned variance types (the last C channels
    are the variance output). sample, noise: (N, C, ...); noise may be None when every t is 0.
    Returns (prev_sample, pred_original_sample), each (N, C, ...)."""
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    predicted_variance = None
    if variance_type in ("learned", "learned_range"):
        C = sample.shape[1] if sample.ndim > 1 else -1
        if model_output.ndim != sample.ndim or model_output.shape[1] != 2 * C:
            raise ValueError(f"model_output must have 2C = {2 * C} channels (axis 1) for variance_type "
                             f"{variance_type!r}, got shape {tuple(model_output.shape)}")
        model_output, predicted_variance = model_output[:, :C], model_output[:, C:]
    check_same_shape(model_output=model_output, sample=sample)
    T = schedule.num_train_timesteps
    t = check_t("t", t, T, sample)
    prev_t = _check_prev(prev_t, t, T, sample)
    noisy = bool(np.any(t > 0))                                      # noise only where t > 0
    if noisy:
        if noise is None:
            raise ValueError("noise is required when some t > 0 (pass an array shaped like sample)")
        check_same_shape(noise=noise, sample=sample)
    # 1. alphas, betas of this (possibly skipping) step
    a_t, a_prev = _host(schedule, schedule.alphas_cumprod[t], _abar_prev(schedule, prev_t, 1.0))
    b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
    alpha_t = a_t / a_prev                                           # current_alpha_t
    beta_t = 1.0 - alpha_t                                           # current_beta_t
    c_x0, c_xt = a_prev**0.5 * beta_t / b_t, alpha_t**0.5 * b_prev / b_t  # mu~ = c_x0 x0^ + c_xt x_t
    # 2. predicted x_0 (DDPM eq. 15), 3. clipped
    x0, _ = to_x0_eps(schedule, model_output, sample, t, prediction_type)
    if clip_sample:
        x0 = get_array_module(x0).clip(x0, -clip_sample_range, clip_sample_range)
    # 4-5. posterior mean mu~_t(x_t, x0^)   (DDPM eq. 7)
    mean = coef_like(c_x0, sample) * x0 + coef_like(c_xt, sample) * sample
    # 6. noise, only where t > 0
    if not noisy:
        return mean, x0
    std = ddpm_std(schedule, t, prev_t, variance_type, predicted_variance, like=sample)
    return mean + coef_like((t > 0).astype(np.float64), sample) * std * noise, x0


def ddim_step(schedule, model_output, t, prev_t, sample, eta=0.0, noise=None, set_alpha_to_one=True,
              prediction_type="epsilon", clip_sample=False, clip_sample_range=1.0, use_clipped_model_output=False):
    """One DDIM step x_t -> x_prev (Song et al. 2021, eq. 12 and eq. 16):

    sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))
    x_prev  = sqrt(abar_prev) x0^ + sqrt(1 - abar_prev - sigma_t^2) eps^ + sigma_t z

    abar_prev at prev_t = -1 is final_alpha_cumprod = 1 if set_alpha_to_one else abar_0.
    eta = 0 is deterministic DDIM, eta = 1 matches DDPM's fixed_small variance. Noise (N, C, ...)
    is needed only when eta > 0. use_clipped_model_output recomputes eps^ from the clipped x0^.
    Returns (prev_sample, pred_original_sample), each (N, C, ...)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if not float(eta) >= 0:
        raise ValueError(f"eta must be >= 0 (0 = DDIM, 1 = DDPM-like), got {eta!r}")
    check_same_shape(model_output=model_output, sample=sample)
    T = schedule.num_train_timesteps
    t = check_t("t", t, T, sample)
    prev_t = _check_prev(prev_t, t, T, sample)
    # 1. alphas of this (possibly skipping) step and sigma_t (DDIM eq. 16)
    final = 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0]   # final_alpha_cumprod
    a_t, a_prev = _host(schedule, schedule.alphas_cumprod[t], _abar_prev(schedule, prev_t, final))
    b_t = 1.0 - a_t
    variance = (1.0 - a_prev) / b_t * (1.0 - a_t / a_prev)               # DDIM eq. 16 with eta = 1
    std = eta * variance**0.5                                            # std_dev_t
    dir2 = 1.0 - a_prev - std**2
    if np.any(dir2 < -1e-12):
        raise ValueError(f"eta = {eta} is too large here: 1 - abar_prev - sigma_t^2 = {np.min(dir2):.3g} < 0")
    if eta > 0:
        if noise is None:
            raise ValueError("noise is required when eta > 0 (pass an array shaped like sample)")
        check_same_shape(noise=noise, sample=sample)
    c_x0, c_eps = a_prev**0.5, np.maximum(dir2, 0.0) ** 0.5              # x_prev = c_x0 x0^ + c_eps eps^ + sigma z
    # 2. predicted x_0 and eps (DDIM eq. 12's "predicted x_0"), 3. clipped, eps^ recomputed from it if asked
    x0, eps = to_x0_eps(schedule, model_output, sample, t, prediction_type)
    xp = get_array_module(x0)
    if clip_sample:
        x0 = xp.clip(x0, -clip_sample_range, clip_sample_range)
    if use_clipped_model_output:
        eps = (sample - coef_like(a_t**0.5, sample) * x0) / coef_like(b_t**0.5, sample)
    # 4. x_prev = sqrt(abar_prev) x0^ + "direction pointing to x_t" + sigma_t z   (DDIM eq. 12)
    prev = coef_like(c_x0, sample) * x0 + coef_like(c_eps, sample) * eps
    if eta > 0:
        prev = prev + coef_like(std, sample) * noise
    return prev, x0


def sample(model_fn, shape, schedule, sampler="ddpm", num_inference_steps=None, timestep_spacing=None,
           steps_offset=0, eta=0.0, variance_type="fixed_small", prediction_type="epsilon", clip_sample=False,
           clip_sample_range=1.0, set_alpha_to_one=True, use_clipped_model_output=False, cond=None, seed=0,
           device=None, dtype=None, x_T=None, noises=None, timesteps=None, prev_timesteps=None,
           return_trajectory=False, callback=None, ops=None, use_karras_sigmas=False):
    """Run the reverse process from x_T ~ N(0, I) to x_0 with ddpm_step or ddim_step.

    for i, t in enumerate(ts):  out = model_fn(x, t * ones(N), cond);  x = step(out, t, prev_ts[i], x, z_i)

    ts = timesteps if given, else make_timesteps(T, n, timestep_spacing, steps_offset), with
    n = num_inference_steps (default T for ddpm, min(50, T) for ddim, as diffusers' pipelines);
    prev_ts = prev_timesteps if given, else the next entry of ts (-1 after the last).
    model_fn(x_t (N, ...), t int64 (N,) on x's backend, cond) -> model_output.
    Random draws: x_T (unless given) then one draw shaped `shape` per step that uses noise
    (ddpm: t > 0; ddim: eta > 0), all from np.random.default_rng(seed) on the host in float64,
    cast to dtype and moved to the device, so NumPy and CuPy see the same numbers.
    noises (n, *shape) replaces the per-step draws (entry i is used at step i).
    device: 'cpu' | 'gpu' (default: x_T's backend, else cpu); dtype default: x_T's, else float32.
    callback(i, t, x, pred_original_sample) runs after step i. variance_type is DDPM's; with a learned type
    the model outputs 2C channels, and DDIM uses only the first C.
    ops: any object with ddpm_step and ddim_step attributes, of this module's signatures (an ops table,
    minidiff.nn.ops.Ops, whose steps may run as one CUDA kernel on CuPy); None runs this module's own.
    Returns x_0 (*shape), or (x_0, trajectory) with trajectory = [x_T, x after step 0, ..., x_0].
    timestep_spacing None: 'leading' for ddpm / ddim, 'linspace' for the others (diffusers' defaults).
    sampler 'euler' | 'euler_a' | 'heun' | 'dpm++2m' runs karras_sampling.sample_karras (use_karras_sigmas:
    Karras et al.'s sigmas); of variance_type they use only whether the output has 2C channels (the first C
    taken, as DDIM); the DDPM/DDIM-only options (set_alpha_to_one, use_clipped_model_output, ops) do not apply."""
    check_choice("sampler", sampler, SAMPLERS)
    check_choice("variance_type", variance_type, VARIANCE_TYPES)
    if sampler in KARRAS_SAMPLERS:
        if eta != 0 or timesteps is not None or prev_timesteps is not None:
            raise ValueError(f"eta, timesteps and prev_timesteps are DDPM/DDIM options; sampler {sampler!r} takes "
                             f"none (custom sigmas: karras_sampling.sample_karras)")
        return sample_karras(model_fn, shape, schedule, sampler, num_inference_steps, use_karras_sigmas,
                             timestep_spacing or "linspace", steps_offset, prediction_type=prediction_type,
                             clip_sample=clip_sample, clip_sample_range=clip_sample_range, cond=cond, seed=seed,
                             device=device, dtype=dtype, x_T=x_T, noises=noises,
                             return_trajectory=return_trajectory, callback=callback, variance_type=variance_type)
    if use_karras_sigmas:
        raise ValueError(f"use_karras_sigmas (--karras) needs sampler euler, euler_a, heun or dpm++2m; {sampler} "
                         f"steps through the integer timesteps, not a sigma schedule")
    timestep_spacing = timestep_spacing or "leading"
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    T = schedule.num_train_timesteps
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or min(shape) < 1:
        raise ValueError(f"shape must be (N, ...) with positive sizes, got {shape}")
    if timesteps is not None:
        if num_inference_steps is not None:
            raise ValueError("pass either num_inference_steps or timesteps (a custom list), not both")
        ts = check_timestep_list("timesteps", timesteps, T)
    else:
        n = num_inference_steps if num_inference_steps is not None else (T if sampler == "ddpm" else min(50, T))
        ts = make_timesteps(T, n, timestep_spacing, steps_offset)
    prev_ts = next_entry_prev_timesteps(ts) if prev_timesteps is None else np.asarray(prev_timesteps, np.int64)
    if prev_ts.shape != ts.shape:
        raise ValueError(f"prev_timesteps must have shape {ts.shape} (one per timestep), got {prev_ts.shape}")
    if noises is not None and len(noises) != len(ts):
        raise ValueError(f"noises must have one entry per step: len {len(ts)}, got {len(noises)}")
    if device is None:
        device = "gpu" if x_T is not None and get_array_module(x_T) is not np else "cpu"
    xp = xp_for(device)
    rng = np.random.default_rng(seed)
    if x_T is None:
        dtype = np.dtype(dtype or np.float32)
        x = xp.asarray(rng.standard_normal(shape).astype(dtype))
    else:
        dtype = np.dtype(dtype or x_T.dtype)
        x = xp.asarray(to_numpy(x_T) if device == "cpu" else x_T, dtype=dtype)
        if tuple(x.shape) != shape:
            raise ValueError(f"x_T must have shape {shape}, got {tuple(x.shape)}")
    step = (ddpm_step if ops is None else ops.ddpm_step) if sampler == "ddpm" else \
        (ddim_step if ops is None else ops.ddim_step)
    trajectory = [x] if return_trajectory else None
    for i, (t, prev_t) in enumerate(zip(ts.tolist(), prev_ts.tolist())):
        needs_noise = t > 0 if sampler == "ddpm" else eta > 0
        z = None
        if needs_noise:
            z = rng.standard_normal(shape) if noises is None else noises[i]
            z = xp.asarray(to_numpy(z) if device == "cpu" else z, dtype=dtype)
        out = model_fn(x, xp.full((shape[0],), t, dtype=xp.int64), cond)
        if sampler == "ddim" and variance_type in ("learned", "learned_range") and len(shape) > 1:
            if out.ndim != len(shape) or out.shape[1] != 2 * shape[1]:
                raise ValueError(f"model_output must have 2C = {2 * shape[1]} channels (axis 1) for variance_type "
                                 f"{variance_type!r}, got shape {tuple(out.shape)}")
            out = out[:, :shape[1]]          # DDIM's sigma is eta's: the learned variance channels go unused
        if sampler == "ddpm":
            x, x0 = step(schedule, out, t, prev_t, x, z, variance_type, prediction_type,
                         clip_sample, clip_sample_range)
        else:
            x, x0 = step(schedule, out, t, prev_t, x, eta, z, set_alpha_to_one, prediction_type,
                         clip_sample, clip_sample_range, use_clipped_model_output)
        if return_trajectory:
            trajectory.append(x)
        if callback is not None:
            callback(i, t, x, x0)
    return (x, trajectory) if return_trajectory else x
