"""Fixtures of the Karras-style samplers for `minidiff fixtures` (the `karras` group of fixtures.py).

Shape legend: T = 1000 (linear schedule), n = num_inference_steps; step inputs are (N, C, H, W) = (2, 2, 3, 3).
"""

from __future__ import annotations

import numpy as np

from .diffusion.karras_samplers import dpmsolver_pp_2m_step, euler_ancestral_step, euler_step, heun_step
from .diffusion.schedule import make_schedule
from .diffusion.sigmas import KARRAS_SAMPLERS, init_noise_sigma, make_sigmas
from .fixtures_model import _rng, _scalar

KARRAS_STEPS = (10, 25)
KARRAS_PREDICTIONS = ("epsilon", "v_prediction", "sample")
STEP_SIGMAS = (14.6, 9.3, 21.0)  # (sigma, sigma_next, sigma_prev): one mid-trajectory step


def karras_fixtures(T: int = 1000, shape=(2, 2, 3, 3)) -> dict:
    """<sampler>.<plain|karras>.n<n>.{timesteps (n,), sigmas (n + 1,), init_noise_sigma} for euler, euler_a,
    heun, dpm++2m at 10 and 25 steps (linspace spacing, final sigma 0; Heun's model calls are at timesteps
    [t0, t1, t1, t2, t2, ...] in diffusers' interleaved list); and <sampler>.<prediction_type>.step.* : one step
    from sigma to sigma_next with its inputs (model_output, sample, noise for euler_a; Heun's second call
    model_output_2 at the Euler point; DPM-Solver++'s history x0_prev at sigma_prev) and outputs."""
    sched, rng, out = make_schedule(T), _rng("karras"), {}
    for sampler in KARRAS_SAMPLERS:
        for karras in (False, True):
            for n in KARRAS_STEPS:
                ts, sg = make_sigmas(sched, n, sampler, karras)
                key = f"{sampler}.{'karras' if karras else 'plain'}.n{n}"
                out[f"{key}.timesteps"], out[f"{key}.sigmas"] = ts, sg
                out[f"{key}.init_noise_sigma"] = _scalar(init_noise_sigma(sg, sampler))
    sigma, sigma_next, sigma_prev = STEP_SIGMAS
    for sampler in KARRAS_SAMPLERS:
        for pred in KARRAS_PREDICTIONS:
            key = f"{sampler}.{pred}.step"
            x, mo = rng.standard_normal(shape) * sigma, rng.standard_normal(shape)
            f = {"sigma": _scalar(sigma), "sigma_next": _scalar(sigma_next), "sample": x, "model_output": mo}
            if sampler == "euler":
                f["prev_sample"], f["pred_original_sample"] = euler_step(mo, sigma, sigma_next, x, pred)
            elif sampler == "euler_a":
                f["noise"] = rng.standard_normal(shape)
                f["prev_sample"], f["pred_original_sample"] = euler_ancestral_step(mo, sigma, sigma_next, x,
                                                                                   f["noise"], pred)
            elif sampler == "heun":
                x_mid, _, half = heun_step(mo, sigma, sigma_next, x, None, pred)
                f["model_output_2"] = rng.standard_normal(shape)
                f["euler_sample"] = x_mid
                f["prev_sample"], f["pred_original_sample"], _ = heun_step(f["model_output_2"], sigma, sigma_next,
                                                                           x_mid, half, pred)
            else:
                f["sample"] = x = x / sigma                        # DPM-Solver++ steps the VP sample
                f["sigma_prev"], f["x0_prev"] = _scalar(sigma_prev), rng.standard_normal(shape)
                f["prev_sample"], f["pred_original_sample"], _ = dpmsolver_pp_2m_step(
                    mo, sigma, sigma_next, x, ((sigma_prev, f["x0_prev"]),), pred)
            out.update({f"{key}.{k}": np.asarray(v) for k, v in f.items()})
    return out
