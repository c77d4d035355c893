"""Classifier-free guidance (Ho & Salimans 2022) and classifier guidance (Dhariwal & Nichol 2021).

Guidance scale convention (diffusers'): eps = eps_uncond + s (eps_cond - eps_uncond), so s = 1 is
plain conditional sampling and s = 0 unconditional. Papers that write
eps = (1 + w) eps_cond - w eps_uncond use w = s - 1 (converters below).

Shape legend: N batch, C channels, "..." the remaining per-item dims; model outputs are (N, C, ...)
or (N, 2C, ...) for learned-variance models (guidance then applies to the first C channels).
"""

from __future__ import annotations

from ..backend import get_array_module
from .schedule import PREDICTION_TYPES, check_choice, check_same_shape, check_t, coef_like, from_x0_eps, to_x0_eps


def guidance_scale_to_w(guidance_scale: float) -> float:
    """w = s - 1  (s: diffusers / this package;  w: Ho & Salimans 2022, eps = (1 + w) eps_c - w eps_u)"""
    return guidance_scale - 1.0


def w_to_guidance_scale(w: float) -> float:
    """s = w + 1  (the inverse of guidance_scale_to_w)"""
    return w + 1.0


def cfg(eps_uncond, eps_cond, guidance_scale: float):
    """eps = eps_uncond + s (eps_cond - eps_uncond)   (Ho & Salimans 2022, eq. 6 with w = s - 1)
    eps_uncond, eps_cond: (N, ...). Returns (N, ...)."""
    check_same_shape(eps_uncond=eps_uncond, eps_cond=eps_cond)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def rescale_noise_cfg(noise_cfg, noise_pred_text, guidance_rescale: float = 0.0):
    """Lin et al. 2023, Sec. 3.4, as diffusers computes it (std over all non-batch dims, unbiased, ddof = 1):

    eps_rescaled = eps_cfg * std(eps_cond) / std(eps_cfg)
    eps = phi eps_rescaled + (1 - phi) eps_cfg,     phi = guidance_rescale in [0, 1]
    noise_cfg, noise_pred_text: (N, ...). Returns (N, ...)."""
    check_same_shape(noise_cfg=noise_cfg, noise_pred_text=noise_pred_text)
    if not 0.0 <= guidance_rescale <= 1.0:
        raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = noise_pred_text.std(axis=axes, keepdims=True, ddof=1)
    std_cfg = noise_cfg.std(axis=axes, keepdims=True, ddof=1)
    noise_pred_rescaled = noise_cfg * (std_text / std_cfg)
    return guidance_rescale * noise_pred_rescaled + (1 - guidance_rescale) * noise_cfg


def cfg_model_output(model_fn, x_t, t, cond, uncond, guidance_scale: float, guidance_rescale: float = 0.0):
    """Run both branches in ONE batched model call, then combine them with cfg (and rescale):

    out_uncond, out_cond = split(model_fn([x_t; x_t], [t; t], [uncond; cond]))     (uncond first, as diffusers)
    out = cfg(out_uncond, out_cond, s), then rescale_noise_cfg(out, out_cond, phi) if phi > 0

    x_t: (N, C, ...); t: (N,) int array; cond: (N, ...) labels or embeddings; uncond: the null
    condition, either (N, ...) or one entry broadcast to cond's shape (a null class id, an empty-prompt
    embedding). A (N, 2C, ...) output (learned variance) is guided on its first C channels and keeps
    the conditional branch's last C channels. Returns the guided model output, shaped like model_fn's."""
    if cond is None:
        raise ValueError("cond must be given for classifier-free guidance (got None)")
    xp = get_array_module(x_t)
    N = x_t.shape[0]
    cond = xp.asarray(cond)
    if cond.ndim < 1 or cond.shape[0] != N:
        raise ValueError(f"cond must have shape (N, ...) with N = {N}, got {tuple(cond.shape)}")
    null = xp.broadcast_to(xp.asarray(uncond, dtype=cond.dtype), cond.shape)
    t = xp.asarray(t)
    t2 = xp.concatenate([t, t]) if t.ndim == 1 else t
    out = model_fn(xp.concatenate([x_t, x_t]), t2, xp.concatenate([null, cond]))
    out_uncond, out_cond = out[:N], out[N:]
    C = x_t.shape[1] if x_t.ndim > 1 else None
    extra = None
    if C is not None and out.ndim == x_t.ndim and out.shape[1] > C:        # learned variance channels
        extra = out_cond[:, C:]
        out_uncond, out_cond = out_uncond[:, :C], out_cond[:, :C]
    guided = cfg(out_uncond, out_cond, guidance_scale)
    if guidance_rescale > 0:
        guided = rescale_noise_cfg(guided, out_cond, guidance_rescale)
    return guided if extra is None else xp.concatenate([guided, extra], axis=1)


def make_guided_model_fn(model_fn, guidance_scale: float, uncond, guidance_rescale: float = 0.0):
    """Wrap model_fn(x_t, t, cond) for classifier-free guidance so that sample() can use it:
    returns fn(x_t, t, cond) = cfg_model_output(model_fn, x_t, t, cond, uncond, guidance_scale, guidance_rescale).
    s = 0 (without rescale) is eps = eps_uncond: one model call on the null condition, the conditional one skipped."""
    if guidance_scale == 0 and guidance_rescale == 0:
        def unconditional_model_fn(x_t, t, cond):
            xp = get_array_module(x_t)
            cond = xp.asarray(cond)
            return model_fn(x_t, t, xp.ascontiguousarray(xp.broadcast_to(xp.asarray(uncond, dtype=cond.dtype),
                                                                          cond.shape)))
        return unconditional_model_fn

    def guided_model_fn(x_t, t, cond):
        return cfg_model_output(model_fn, x_t, t, cond, uncond, guidance_scale, guidance_rescale)
    return guided_model_fn


def classifier_guided_eps(schedule, eps, x_t, t, grad_fn, classifier_scale: float, y=None):
    """eps^ = eps - sqrt(1 - abar_t) * scale * grad_x log p(y | x_t)   (Dhariwal & Nichol 2021, Algorithm 2 / eq. 14)

    grad_fn(x_t, t, y) -> grad_x log p(y | x_t), shaped like x_t (N, ...); t: int or (N,).
    Returns eps^ (N, ...)."""
    check_same_shape(eps=eps, x_t=x_t)
    th = check_t("t", t, schedule.num_train_timesteps, x_t)
    grad = grad_fn(x_t, t, y)
    check_same_shape(grad=grad, x_t=x_t)
    return eps - coef_like(schedule.sqrt_one_minus_alphas_cumprod[th] * classifier_scale, x_t) * grad


def make_classifier_guided_model_fn(model_fn, schedule, grad_fn, classifier_scale: float,
                                    prediction_type: str = "epsilon"):
    """Wrap model_fn for classifier guidance toward y = cond: the output is turned into eps,
    guided with classifier_guided_eps, and turned back into the same prediction type
    (x0^ recomputed from x_t and eps^, so the returned output is consistent at x_t)."""
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)

    def guided_model_fn(x_t, t, cond):
        out = model_fn(x_t, t, cond)
        _, eps = to_x0_eps(schedule, out, x_t, t, prediction_type)
        eps = classifier_guided_eps(schedule, eps, x_t, t, grad_fn, classifier_scale, y=cond)
        x0, _ = to_x0_eps(schedule, eps, x_t, t, "epsilon")
        return from_x0_eps(schedule, x0, eps, t, prediction_type)
    return guided_model_fn
