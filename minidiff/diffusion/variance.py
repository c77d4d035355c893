"""The variance sigma_t^2 of one reverse step, as a value (DDPM and DDIM), for checking another implementation.

ddpm_std (sampler.py) returns the DDPM step's standard deviation and ddim_step uses DDIM's inside the
step; these return the variances themselves, host float64 of shape () or (N,) for the fixed types.
t, prev_t: one int or an int array (N,); any negative prev_t means "before the start".
"""

from __future__ import annotations

import numpy as np

from .sampler import _abar_prev, _check_prev, ddpm_std
from .schedule import check_t


def ddpm_variance(schedule, t, prev_t, variance_type="fixed_small", predicted_variance=None):
    """sigma_t^2 of the DDPM step t -> prev_t: beta~_t' = (1 - abar_prev) / (1 - abar_t) beta_t' (fixed_small,
    floored at 1e-20 as diffusers), beta_t' = 1 - abar_t / abar_prev (fixed_large); learned types from the
    model's predicted_variance (N, C, ...). = ddpm_std(...)**2."""
    return ddpm_std(schedule, t, prev_t, variance_type, predicted_variance) ** 2


def ddim_variance(schedule, t, prev_t, eta=1.0, set_alpha_to_one=True):
    """sigma_t^2 = eta^2 (1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)    (DDIM eq. 16)
    abar_prev before the start is 1 (set_alpha_to_one) or abar_0. eta = 1 equals ddpm_variance's fixed_small
    (before its 1e-20 floor). Returns host float64, shape () or (N,)."""
    T = schedule.num_train_timesteps
    t = check_t("t", t, T)
    prev_t = _check_prev(prev_t, t, T, None)
    a_t = schedule.alphas_cumprod[t]
    a_prev = _abar_prev(schedule, prev_t, 1.0 if set_alpha_to_one else schedule.alphas_cumprod[0])
    return float(eta) ** 2 * (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
