"""Noise schedules and the forward process q(x_t | x_0), in diffusers' conventions.

Timesteps are 0-indexed: t in [0, T), and t = 0 is the paper's t = 1 (the first noising step).
The schedule arrays are float64 NumPy arrays on the host; every function gathers the
coefficients it needs there (so an out-of-range t is caught on the host, where CuPy would
not raise) and casts them to the sample's dtype and backend at use. Float64 inputs therefore
get float64 arithmetic all the way through.

Shape legend: N batch, "..." any per-item dims (C, H, W for images); T = num_train_timesteps.
A timestep argument t is one int (all items) or an int array of shape (N,) (one per item).

Names follow the DDPM code lineage (hojonathanho/diffusion `diffusion_utils_2.py`) and the
options follow diffusers' DDPMScheduler (`beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_numpy

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


# ----------------------------------------------------------------------------- validation


def check_choice(name: str, value, allowed) -> None:
    """Raise ValueError naming the argument unless value is one of allowed."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_t(name: str, t, T: int, x=None, low: int = 0):
    """Validate timesteps on the host; return them as an int64 NumPy array of shape () or (N,).

    t: one int, or an integer array of shape (N,) with N = x.shape[0] when x is given.
    Every value must lie in [low, T) (low = -1 for a previous timestep, meaning "before the start").
    """
    host = to_numpy(t)
    if host.dtype == np.bool_ or not np.issubdtype(host.dtype, np.integer):
        raise ValueError(f"{name} must be an int or an integer array of shape (N,), got dtype {host.dtype}")
    if host.ndim > 1 or (host.ndim == 1 and x is not None and (x.ndim == 0 or host.shape[0] != x.shape[0])):
        n = "N" if x is None or x.ndim == 0 else x.shape[0]
        raise ValueError(f"{name} must be one int or have shape (N,) = ({n},), got shape {host.shape}")
    if host.size and (host.min() < low or host.max() >= T):
        raise ValueError(f"{name} must lie in [{low}, {T}) (num_train_timesteps = {T}), "
                         f"got values in [{host.min()}, {host.max()}]")
    return host.astype(np.int64)


def check_same_shape(**arrays) -> None:
    """Raise ValueError naming the arrays unless they all have the same shape."""
    shapes = {k: tuple(v.shape) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"shape mismatch: {shapes}; these arrays must have the same shape")


def coef_like(c, x):
    """Host float64 coefficient(s) c of shape () or (N,) -> in x's dtype, broadcasting against x (N, ...):
    one value -> a NumPy scalar (on CuPy a kernel argument: no host -> device copy, e.g. in a sampling step);
    per sample (N,) -> an array on x's backend shaped (N, 1, ..., 1)."""
    c = np.asarray(c, np.float64)
    if c.ndim == 0:
        return x.dtype.type(c)
    xp = get_array_module(x)
    return xp.asarray(c.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype))


# ----------------------------------------------------------------------------- betas


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """beta_i = min(1 - abar(t_{i+1}) / abar(t_i), max_beta), t_i = i / T,
    abar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)        (Nichol & Dhariwal 2021, eq. 17; 'squaredcos_cap_v2')"""
    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_diffusion_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)])


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Shift and scale sqrt(abar) so that sqrt(abar_{T-1}) = 0 and sqrt(abar_0) is unchanged:
    s' = (s - s_last) * s_0 / (s_0 - s_last), s = sqrt(abar)   (Lin et al. 2023, Algorithm 1)"""
    s = np.sqrt(np.cumprod(1.0 - betas))
    s0, s_last = s[0], s[-1]
    s = (s - s_last) * s0 / (s0 - s_last)
    alphas_bar = s**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def make_betas(num_train_timesteps, beta_schedule, beta_start, beta_end) -> np.ndarray:
    """The betas of a named schedule, float64, shape (T,):
    linear          beta_t = linspace(beta_start, beta_end, T)
    scaled_linear   beta_t = linspace(sqrt(beta_start), sqrt(beta_end), T)^2      (latent diffusion)
    squaredcos_cap_v2   betas_for_alpha_bar(T), capped at max_beta = 0.999          (GLIDE cosine)
    sigmoid         beta_t = sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start   (GeoDiff)"""
    T = num_train_timesteps
    check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, T, dtype=np.float64)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return betas_for_alpha_bar(T)
    return 1.0 / (1.0 + np.exp(-np.linspace(-6.0, 6.0, T))) * (beta_end - beta_start) + beta_start


def linspace_float32(start, end, n):
    """torch.linspace(start, end, n, dtype=torch.float32) bit for bit: step = (end - start) / (n - 1) in float32;
    start + step i for i < n // 2, end - step (n - 1 - i) after, each rounded once (a fused multiply-add)."""
    s0, s1 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([s0])
    step, i = np.float64((s1 - s0) / np.float32(n - 1)), np.arange(n)
    return np.where(i < n // 2, np.float64(s0) + step * i, np.float64(s1) - step * (n - 1 - i)).astype(np.float32)


# ----------------------------------------------------------------------------- the schedule


@dataclass(frozen=True, eq=False)
class Schedule:
    """A frozen noise schedule: float64 host arrays of shape (T,), read-only. abar = alphas_cumprod."""

    num_train_timesteps: int
    beta_schedule: str
    betas: np.ndarray                          # beta_t
    alphas: np.ndarray                         # alpha_t = 1 - beta_t
    alphas_cumprod: np.ndarray                 # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: np.ndarray            # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: np.ndarray            # sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod: np.ndarray  # sqrt(1 - abar_t)
    log_one_minus_alphas_cumprod: np.ndarray   # log(1 - abar_t)
    sqrt_recip_alphas_cumprod: np.ndarray      # 1 / sqrt(abar_t)   (inf at a zero-SNR end)
    sqrt_recipm1_alphas_cumprod: np.ndarray    # sqrt(1 / abar_t - 1)
    posterior_variance: np.ndarray             # beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)   (DDPM eq. 7)
    posterior_log_variance_clipped: np.ndarray  # log beta~_t, with beta~_0 (= 0) replaced by beta~_1
    posterior_mean_coef1: np.ndarray           # beta_t sqrt(abar_{t-1}) / (1 - abar_t)     (times x_0)
    posterior_mean_coef2: np.ndarray           # (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t)   (times x_t)
    snr: np.ndarray                            # abar_t / (1 - abar_t)
    schedule_dtype: str = "float64"            # "float32": betas and abar rounded as diffusers keeps them

    def __len__(self) -> int:
        return self.num_train_timesteps


def make_schedule(num_train_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                  beta_end: float = 0.02, trained_betas=None, rescale_betas_zero_snr: bool = False,
                  schedule_dtype: str = "float64") -> Schedule:
    """Build a Schedule (defaults = diffusers' DDPMScheduler). trained_betas, when given, overrides
    beta_schedule/beta_start/beta_end and must have length num_train_timesteps.
    schedule_dtype "float32" reproduces diffusers as shipped: betas rounded to float32, alphas = 1 - betas
    and abar = cumprod(alphas) computed in float32 (torch's order); every other array follows from those
    values in float64. The float64 default is the oracle's.

    Invariants checked here: 0 < beta_t <= 1, abar strictly decreasing from abar_0 < 1,
    abar_t > 0 except abar_{T-1} = 0 with rescale_betas_zero_snr."""
    T = num_train_timesteps
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"num_train_timesteps must be an int >= 1, got {T!r}")
    T = int(T)
    if trained_betas is not None:
        betas = np.array(to_numpy(trained_betas), dtype=np.float64)
        if betas.shape != (T,):
            raise ValueError(f"trained_betas must have shape (num_train_timesteps,) = ({T},), got {betas.shape}")
        beta_schedule = "trained"
    else:
        betas = make_betas(T, beta_schedule, float(beta_start), float(beta_end))
    if rescale_betas_zero_snr:
        if T < 2:
            raise ValueError("rescale_betas_zero_snr needs num_train_timesteps >= 2")
        betas = rescale_zero_terminal_snr(betas)
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas <= 1)):
        raise ValueError(f"betas must lie in (0, 1]; got min {betas.min():.3g}, max {betas.max():.3g} "
                         f"(check beta_start, beta_end or trained_betas)")
    check_choice("schedule_dtype", schedule_dtype, ("float64", "float32"))
    if schedule_dtype == "float32":  # diffusers: betas, alphas, alphas_cumprod are float32 tensors
        betas32 = betas.astype(np.float32)
        if trained_betas is None and beta_schedule == "linear":
            betas32 = linspace_float32(beta_start, beta_end, T)
        elif trained_betas is None and beta_schedule == "scaled_linear":
            betas32 = linspace_float32(beta_start**0.5, beta_end**0.5, T) ** 2
        alphas32 = np.float32(1.0) - betas32
        abar = np.cumprod(alphas32.astype(np.float64)).astype(np.float32).astype(np.float64)  # torch's cumprod
        betas, alphas = betas32.astype(np.float64), alphas32.astype(np.float64)
    else:
        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    if not (abar[0] < 1 and np.all(np.diff(abar) < 0) and np.all(abar[:-1] > 0)):
        raise ValueError("alphas_cumprod must decrease strictly and stay > 0 before the last step "
                         "(a beta of 1 is allowed only at t = T-1)")
    with np.errstate(divide="ignore"):
        posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        arrays = dict(
            betas=betas, alphas=alphas, alphas_cumprod=abar, alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=np.sqrt(abar), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
            log_one_minus_alphas_cumprod=np.log(1.0 - abar),
            sqrt_recip_alphas_cumprod=1.0 / np.sqrt(abar), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar - 1.0),
            posterior_variance=posterior_variance,
            posterior_log_variance_clipped=np.log(np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
                                                  if T > 1 else posterior_variance.clip(1e-20)),
            posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
            snr=abar / (1.0 - abar),
        )
    for a in arrays.values():
        a.flags.writeable = False
    return Schedule(num_train_timesteps=T, beta_schedule=beta_schedule, schedule_dtype=schedule_dtype, **arrays)


# ----------------------------------------------------------------------------- forward process


def add_noise(schedule: Schedule, x0, noise, t):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps          (DDPM eq. 4, q(x_t | x_0))
    x0, noise: (N, ...); t: int or (N,). Returns x_t (N, ...)."""
    check_same_shape(x0=x0, noise=noise)
    t = check_t("t", t, schedule.num_train_timesteps, x0)
    return coef_like(schedule.sqrt_alphas_cumprod[t], x0) * x0 + \
        coef_like(schedule.sqrt_one_minus_alphas_cumprod[t], x0) * noise


def forward_step(schedule: Schedule, x_prev, noise, t):
    """x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps      (DDPM eq. 2, q(x_t | x_{t-1}))
    With 0-indexed t, forward_step(x_0, t=0) is the first noising step; composing it for
    t = 0, 1, ..., t gives add_noise(x_0, t) in distribution. Returns x_t (N, ...)."""
    check_same_shape(x_prev=x_prev, noise=noise)
    t = check_t("t", t, schedule.num_train_timesteps, x_prev)
    return coef_like(np.sqrt(schedule.alphas[t]), x_prev) * x_prev + \
        coef_like(np.sqrt(schedule.betas[t]), x_prev) * noise


def get_velocity(schedule: Schedule, sample, noise, t):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0    (Salimans & Ho 2022; diffusers' get_velocity(sample, noise, t))
    sample is x_0. Returns v (N, ...)."""
    check_same_shape(sample=sample, noise=noise)
    t = check_t("t", t, schedule.num_train_timesteps, sample)
    return coef_like(schedule.sqrt_alphas_cumprod[t], sample) * noise - \
        coef_like(schedule.sqrt_one_minus_alphas_cumprod[t], sample) * sample


# ----------------------------------------------------------------------------- prediction types


def to_x0_eps(schedule: Schedule, model_output, sample, t, prediction_type: str = "epsilon"):
    """(x_0, eps) implied by a model output at x_t = sample:
    epsilon:       x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)           (DDPM eq. 15)
    sample:        eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)
    v_prediction:  x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v,  eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t
    Returns (pred_original_sample, pred_epsilon), each (N, ...). With a zero-SNR end
    (abar_{T-1} = 0) the epsilon type gives inf at t = T-1, as in diffusers; use v_prediction there."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_same_shape(model_output=model_output, sample=sample)
    t = check_t("t", t, schedule.num_train_timesteps, sample)
    a, b = schedule.alphas_cumprod[t], 1.0 - schedule.alphas_cumprod[t]
    with np.errstate(divide="ignore"):
        if prediction_type == "epsilon":
            eps = model_output
            x0 = (sample - coef_like(b**0.5, sample) * eps) / coef_like(a**0.5, sample)
        elif prediction_type == "sample":
            x0 = model_output
            eps = (sample - coef_like(a**0.5, sample) * x0) / coef_like(b**0.5, sample)
        else:
            x0 = coef_like(a**0.5, sample) * sample - coef_like(b**0.5, sample) * model_output
            eps = coef_like(a**0.5, sample) * model_output + coef_like(b**0.5, sample) * sample
    return x0, eps


def from_x0_eps(schedule: Schedule, x0, eps, t, prediction_type: str = "epsilon"):
    """The model output (training target) of a prediction type, given x_0 and eps:
    epsilon -> eps;  sample -> x_0;  v_prediction -> v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0.
    The inverse of to_x0_eps at x_t = add_noise(x_0, eps, t). Returns (N, ...)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    check_same_shape(x0=x0, eps=eps)
    check_t("t", t, schedule.num_train_timesteps, x0)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return get_velocity(schedule, x0, eps, t)
