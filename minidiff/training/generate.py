"""Sampling from a trained model: classifier-free guidance, classifier guidance, DDPM or DDIM.

Shape legend: N samples, C channels, H = W = image side, L prompt tokens.

    eps = eps_uncond + s (eps_cond - eps_uncond)                     (classifier-free guidance)
    eps^ = eps - sqrt(1 - abar_t) * scale * grad_x log p(y | x_t)    (classifier guidance)
"""

from __future__ import annotations

from pathlib import Path

from ..backend import to_device, xp_for
from .bundle import load_bundle
from ..diffusion.guidance import make_classifier_guided_model_fn, make_guided_model_fn
from ..diffusion.sampler import sample
from ..diffusion.sigmas import KARRAS_SAMPLERS
from ..diffusion.timesteps import ddim_prev_timesteps, make_timesteps


def generate(bundle, cond=None, n: int = 16, guidance_scale: float = 3.0, sampler: str = "ddim",
             steps: int = 50, eta: float = 0.0, seed: int = 0, guidance_rescale: float = 0.0,
             grad_fn=None, classifier_scale: float = 0.0, device: str = "cpu", dtype: str = "float32",
             callback=None, noise=None, use_clipped_model_output: bool = True, karras: bool = False):
    """Draw n images (N, C, H, W) in [-1, 1] (clipped) from bundle with condition cond (host array or None).

    bundle: a Bundle, or a path (run directory, checkpoint .npz, diffusers folder) loaded with load_bundle;
    cond: class ids (N,) of a class model, token ids (N, L) or a list of N prompts of a text model.

    guidance_scale s applies when the model is conditioned and s != 1 (s = 1: one conditional
    call per step; s = 0 gives the same samples as the unconditional model). grad_fn(x_t, t, y) ->
    grad_x log p(y | x_t), when given, adds classifier guidance with classifier_scale (the target
    labels are closed over by grad_fn; see classifier.make_grad_fn). bundle.ops runs the model and the
    reverse steps (REFERENCE unless the caller set the fast table).
    noise (host array or None): x_T (N, C, H, W), or (1 + steps, N, C, H, W) = x_T, then the noise of
    each step (entry 1 + i at step i, read only where that step draws noise), so samples can equal
    DDPMPipeline's / DDIMPipeline's fed the same draws; None draws them from seed.
    use_clipped_model_output (DDIM): re-derive eps from the clipped x0^ (minidiff's default; diffusers'
    DDIMPipeline defaults to False). bundle.sampler_options (a diffusers scheduler's clip_sample,
    timestep_spacing, ...) go to the sampler; DDIM steps to t - T // n, as DDIMScheduler does.
    sampler: ddpm | ddim | euler | euler_a | heun | dpm++2m (diffusion/karras_sampling.py); karras: Karras
    et al.'s sigmas for the last four (refused with ddpm / ddim).
    """
    if isinstance(bundle, (str, Path)):  # a run directory, a checkpoint .npz or a diffusers folder
        bundle = load_bundle(bundle, device=device, dtype=dtype)
    if cond is not None and bundle.conditioning == "text" and isinstance(cond[0], str):
        cond = bundle.encode(prompts=list(cond))  # prompts -> token ids (N, L)
    xp = xp_for(device)
    c = bundle.config
    shape = (n, c.in_channels, c.sample_size, c.sample_size)
    model_fn = bundle.model_fn
    if bundle.conditioning != "none":
        if cond is None or len(cond) != n:
            raise ValueError(f"cond must hold one condition per sample (n = {n})")
        cond = to_device(cond, device)
        if guidance_scale != 1.0:
            model_fn = make_guided_model_fn(model_fn, guidance_scale, xp.asarray(bundle.null_condition),
                                            guidance_rescale)
    else:
        cond = None
    if grad_fn is not None and classifier_scale != 0.0:
        if sampler in KARRAS_SAMPLERS:
            raise ValueError(f"classifier guidance (--classifier) runs with --sampler ddpm or ddim, not {sampler} "
                             f"(its gradient term is scaled at integer timesteps)")
        model_fn = make_classifier_guided_model_fn(model_fn, bundle.schedule, grad_fn, classifier_scale,
                                                   bundle.prediction_type)
    # clip x0^ to [-1, 1] and, in DDIM, re-derive eps from the clipped x0^ (guided-diffusion's DDIM):
    # without the re-derivation a clipped x0^ keeps only part of a guidance term, which can then
    # point away from the target
    opts = dict(dict(clip_sample=True), **bundle.sampler_options)
    if sampler == "ddim":  # DDIMScheduler's previous timestep (the next entry for 'leading' spacing)
        T = bundle.schedule.num_train_timesteps
        ts = make_timesteps(T, steps, opts.get("timestep_spacing", "leading"), opts.get("steps_offset", 0))
        opts["prev_timesteps"] = ddim_prev_timesteps(ts, T, steps)
    x_T, noises = split_noise(noise, shape, steps)
    x = sample(model_fn, shape, bundle.schedule, sampler=sampler, num_inference_steps=steps, eta=eta,
               prediction_type=bundle.prediction_type, use_clipped_model_output=use_clipped_model_output,
               cond=cond, seed=seed, x_T=x_T, noises=noises,
               device=device, dtype=dtype, callback=callback, ops=bundle.ops, use_karras_sigmas=karras, **opts)
    return xp.clip(x, -1.0, 1.0)


def split_noise(noise, shape, steps: int):
    """(x_T, noises) from an injected noise array: x_T alone (N, C, H, W) -> (x_T, None), or
    (1 + steps, N, C, H, W) -> (noise[0], noise[1:]); None -> (None, None). ValueError otherwise."""
    if noise is None:
        return None, None
    if tuple(noise.shape) == tuple(shape):
        return noise, None
    if tuple(noise.shape) == (1 + steps, *shape):
        return noise[0], noise[1:]
    raise ValueError(f"noise must have shape {tuple(shape)} (x_T) or {(1 + steps, *shape)} (x_T, then one draw "
                     f"per step), got {tuple(noise.shape)}")
