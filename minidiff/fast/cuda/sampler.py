"""The reverse-step update of diffusion/sampler.py on CuPy: x0^, eps^ and x_prev in one kernel.

fast/sampler.py's ddpm_step and ddim_step call reverse_step_cuda on CuPy when the step has one timestep
for the whole batch (as diffusion.sampler.sample's loop has) and a fixed variance. The coefficients
are computed there as diffusion/sampler.py computes them, in float64 on the host; the kernel
body is the array lines of schedule.to_x0_eps, the clip and the update, in the same order, each
coefficient rounded to the sample's dtype as schedule.coef_like rounds it. Compiled with
--fmad=false (no multiply-add contracted into one rounding), it gives the array ops' numbers bit for
bit (tests/device_checks.check_reverse_step_bit_for_bit).

    DDPM, epsilon (the default)  8 array ops (6 at t = 0), 1 launch here
    DDIM, epsilon, eta = 0        6 array ops (8 with eta > 0), 1 launch here

Shape legend: N batch, C channels, "..." the remaining per-item dims; model_output, sample and
noise are (N, C, ...).
"""

from __future__ import annotations

_KERNELS: dict = {}  # "reverse_step" -> cupy.ElementwiseKernel, made on first use
_OPTIONS = ("--fmad=false",)  # round each operation on its own, as the array ops do
PREDICTION_CODES = {"epsilon": 0, "sample": 1, "v_prediction": 2}  # the kernel's ptype


def _kernels(xp) -> dict:
    if not _KERNELS:
        _KERNELS["reverse_step"] = xp.ElementwiseKernel(
            "T model_output, T x, T z, T ca, T cb, int32 ptype, int32 clip, T lo, T hi, int32 recompute_eps, "
            "T k0, T k1, int32 use_eps, int32 noisy, T ks",
            "T prev_sample, T pred_original_sample",
            """
            T x0, eps;                                  // ca = sqrt(abar_t), cb = sqrt(1 - abar_t)
            if (ptype == 0) {                           // epsilon:  x0 = (x_t - cb eps) / ca
                eps = model_output;
                x0 = (x - cb * eps) / ca;
            } else if (ptype == 1) {                    // sample:   eps = (x_t - ca x0) / cb
                x0 = model_output;
                eps = (x - ca * x0) / cb;
            } else {                                    // v_prediction
                x0 = ca * x - cb * model_output;        // x0 = ca x_t - cb v
                eps = ca * model_output + cb * x;       // eps = ca v + cb x_t
            }
            if (clip) x0 = x0 < lo ? lo : (x0 > hi ? hi : x0);  // clip(x0, -r, r)
            if (recompute_eps) eps = (x - ca * x0) / cb;        // DDIM's use_clipped_model_output
            T p = k0 * x0 + k1 * (use_eps ? eps : x);   // DDPM: k0 x0 + k1 x_t; DDIM: k0 x0 + k1 eps
            if (noisy) p = p + ks * z;                  // + sigma_t z
            prev_sample = p;
            pred_original_sample = x0;
            """, "minidiff_reverse_step", options=_OPTIONS)
    return _KERNELS


def reverse_step_cuda(xp, model_output, sample, noise, *, abar_t: float, prediction_type: str, clip_range,
                      k0: float, k1: float, use_eps: bool, recompute_eps: bool = False, noise_std: float = 0.0):
    """(prev_sample, pred_original_sample), each (N, C, ...), of one reverse step, in one kernel:

    x0^, eps^ = to_x0_eps(model_output, x_t)     clipped to [-r, r] when clip_range = r is not None
    x_prev    = k0 x0^ + k1 (eps^ if use_eps else x_t)  [+ noise_std z when noise is not None]

    The scalars are host float64 values; the kernel rounds them to the sample's dtype (T)."""
    noisy, clip = noise is not None, clip_range is not None
    r = float(clip_range) if clip else 0.0
    ca, cb = abar_t**0.5, (1.0 - abar_t) ** 0.5  # as to_x0_eps computes them, in float64
    # Python numbers: CuPy takes numbers and NumPy scalars as kernel arguments but not a 0-d NumPy array (as
    # np.where makes), and rounds each to T as coef_like does
    return _kernels(xp)["reverse_step"](
        model_output, sample, noise if noisy else sample, float(ca), float(cb), PREDICTION_CODES[prediction_type],
        int(clip), -r, r, int(recompute_eps), float(k0), float(k1), int(use_eps), int(noisy), float(noise_std))
