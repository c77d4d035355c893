"""The Gaussian pieces of the variational bound, each with the derivative its training gradient needs.

    KL(N(m1, e^lv1) || N(m2, e^lv2)) = 1/2 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^-lv2)
    Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))                  (the CDF improved-diffusion uses)
    p(x_0 | x_1) = prod_d  [Phi((x + 1/255 - m) / s) - Phi((x - 1/255 - m) / s)]    (DDPM sec. 3.3)

These are improved-diffusion's `normal_kl`, `approx_standard_normal_cdf` and
`discretized_gaussian_log_likelihood` (Nichol & Dhariwal 2021; ported from Ho et al.'s diffusion_tf
utils.py), in nats, elementwise, in the inputs' dtype and backend (float64 in, float64 out).
The bound's terms, and the loss that learns the variance, are in vlb.py.

Shape legend: "..." any shape; every function broadcasts its array arguments (NumPy rules).
Data x for the discretized decoder: 8-bit images mapped to [-1, 1], x = k / 127.5 - 1, k in 0..255.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module, to_numpy

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
BIN = 1.0 / 255.0        # half the width of one 8-bit bin in [-1, 1] (the bins are 2/255 wide)
LOG_FLOOR = 1e-12        # probabilities are clamped here before the log, as improved-diffusion does


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(m1, e^lv1) || N(m2, e^lv2)) = 1/2 (-1 + lv2 - lv1 + e^(lv1 - lv2) + (m1 - m2)^2 e^-lv2)   (nats)

    Elementwise over broadcast arrays (any of them may be a Python float); improved-diffusion's normal_kl."""
    xp = get_array_module(mean1, logvar1, mean2, logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + xp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * xp.exp(-logvar2))


def normal_kl_dlogvar2(mean1, logvar1, mean2, logvar2):
    """d KL / d lv2 = 1/2 (1 - e^(lv1 - lv2) - (m1 - m2)^2 e^-lv2)   (the only derivative training needs:
    the learned variance is the second Gaussian's; its mean is stop-gradiented)."""
    xp = get_array_module(mean1, logvar1, mean2, logvar2)
    return 0.5 * (1.0 - xp.exp(logvar1 - logvar2) - (mean1 - mean2) ** 2 * xp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Phi(x) ~ 1/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))   (the tanh approximation; |error| < 3e-4)"""
    xp = get_array_module(x)
    return 0.5 * (1.0 + xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3)))


def approx_standard_normal_pdf(x):
    """d Phi / dx = 1/2 (1 - tanh(u)^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2),  u = sqrt(2/pi) (x + 0.044715 x^3)
    (the derivative of approx_standard_normal_cdf, not the exact normal density)."""
    xp = get_array_module(x)
    th = xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * x**3))
    return 0.5 * (1.0 - th * th) * SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * x * x)


def check_8bit(x, atol: float = 1e-3):
    """Raise ValueError unless x holds 8-bit data in [-1, 1]: x = k / 127.5 - 1 with integer k in 0..255
    (within atol of a level, in units of k). The discretized decoder is the likelihood of such data only;
    quantize first with quantize_8bit if the data are not on the grid."""
    k = (np.asarray(to_numpy(x), np.float64) + 1.0) * 127.5
    off = np.abs(k - np.rint(k))
    if k.size and (k.min() < -atol or k.max() > 255 + atol or off.max() > atol):
        raise ValueError("the discretized decoder needs 8-bit data x = k / 127.5 - 1, k in 0..255 (256 levels in "
                         f"[-1, 1]); got values in [{k.min() / 127.5 - 1:.4g}, {k.max() / 127.5 - 1:.4g}] up to "
                         f"{off.max():.3g} levels off the grid (quantize them first with quantize_8bit)")


def quantize_8bit(x):
    """x -> round((x + 1) 127.5) / 127.5 - 1, clipped to [-1, 1]: the nearest of the 256 levels."""
    xp = get_array_module(x)
    return xp.clip(xp.rint((x + 1.0) * 127.5), 0, 255) / 127.5 - 1.0


def discretized_gaussian_log_likelihood(x, means, log_scales, check: bool = True):
    """log p(x) = log [Phi((x - m + 1/255) / s) - Phi((x - m - 1/255) / s)],  s = e^log_scales    (DDPM sec. 3.3)

    with the edge bins open: log Phi((x - m + 1/255) / s) at x = -1 and log(1 - Phi((x - m - 1/255) / s)) at
    x = 1; every probability clamped at 1e-12 before the log (improved-diffusion's discretized_gaussian_
    log_likelihood). x, means, log_scales: the same shape; x 8-bit (check_8bit unless check=False).
    Returns log probabilities in nats, shaped like x."""
    return _decoder(x, means, log_scales, check)[0]


def discretized_gaussian_log_likelihood_dlogscale(x, means, log_scales, check: bool = True):
    """d log p(x) / d log_scales (s = e^log_scales): with a = (x - m +- 1/255) / s, da / dlog_scales = -a, so

    middle bins:  (-phi(a+) a+ + phi(a-) a-) / (Phi(a+) - Phi(a-));   x = -1:  -phi(a+) a+ / Phi(a+);
    x = 1:  phi(a-) a- / (1 - Phi(a-));   0 where the probability was clamped at 1e-12 (phi = d Phi / da).
    Returns (log p, d log p / d log_scales), each shaped like x."""
    log_probs, (plus_in, min_in, cdf_plus, cdf_min, low, high) = _decoder(x, means, log_scales, check)
    xp = get_array_module(log_probs)
    pdf_plus, pdf_min = approx_standard_normal_pdf(plus_in), approx_standard_normal_pdf(min_in)
    # forward: log_probs = where(low, log Phi(a+), where(high, log(1 - Phi(a-)), log(Phi(a+) - Phi(a-))))
    prob = xp.where(low, cdf_plus, xp.where(high, 1.0 - cdf_min, cdf_plus - cdf_min))
    dprob = xp.where(low, -pdf_plus * plus_in, xp.where(high, pdf_min * min_in, -pdf_plus * plus_in + pdf_min * min_in))
    # forward: log(prob.clamp(min=1e-12)): no gradient where the clamp is active
    dlog = xp.where(prob > LOG_FLOOR, dprob / xp.maximum(prob, LOG_FLOOR), 0.0)
    return log_probs, dlog


def _decoder(x, means, log_scales, check):
    """The forward of discretized_gaussian_log_likelihood and what its derivative reuses."""
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(f"x, means and log_scales must have the same shape, got {x.shape}, {means.shape}, "
                         f"{log_scales.shape}")
    if check:
        check_8bit(x)
    xp = get_array_module(x, means, log_scales)
    centered_x = x - means
    inv_stdv = xp.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + BIN)                    # a+ = (x - m + 1/255) / s
    min_in = inv_stdv * (centered_x - BIN)                     # a- = (x - m - 1/255) / s
    cdf_plus, cdf_min = approx_standard_normal_cdf(plus_in), approx_standard_normal_cdf(min_in)
    log_cdf_plus = xp.log(xp.maximum(cdf_plus, LOG_FLOOR))            # the bin (-inf, -1 + 1/255]
    log_one_minus_cdf_min = xp.log(xp.maximum(1.0 - cdf_min, LOG_FLOOR))  # the bin [1 - 1/255, inf)
    log_cdf_delta = xp.log(xp.maximum(cdf_plus - cdf_min, LOG_FLOOR))
    low, high = x < -0.999, x > 0.999
    log_probs = xp.where(low, log_cdf_plus, xp.where(high, log_one_minus_cdf_min, log_cdf_delta))
    return log_probs, (plus_in, min_in, cdf_plus, cdf_min, low, high)


def gaussian_log_likelihood(x, means, log_scales):
    """log N(x; m, s^2) = -1/2 log(2 pi) - log s - (x - m)^2 / (2 s^2)   (a continuous decoder, for
    continuous data: the analytic checks with Gaussian data; in nats, shaped like x)."""
    xp = get_array_module(x, means, log_scales)
    return -0.5 * math.log(2 * math.pi) - log_scales - 0.5 * (x - means) ** 2 * xp.exp(-2.0 * log_scales)


def gaussian_log_likelihood_dlogscale(x, means, log_scales):
    """d log N(x; m, s^2) / d log s = -1 + (x - m)^2 / s^2."""
    xp = get_array_module(x, means, log_scales)
    return -1.0 + (x - means) ** 2 * xp.exp(-2.0 * log_scales)
