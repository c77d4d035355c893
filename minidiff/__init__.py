"""minidiff: denoising diffusion from scratch in NumPy/CuPy, every backward written by hand.

The names an implementer calls are reachable from here (`from minidiff import make_schedule, ddpm_step`);
each is imported from its module on first use (PEP 562), so `import minidiff` stays light.
"""

__version__ = "0.1.0"

# name -> the module that defines it (relative to this package)
_EXPORTS = {
    "diffusion.schedule": ("Schedule", "make_schedule", "add_noise", "forward_step", "get_velocity", "to_x0_eps",
                           "from_x0_eps", "BETA_SCHEDULES", "PREDICTION_TYPES"),
    "diffusion.timesteps": ("make_timesteps", "prev_timesteps", "ddim_prev_timesteps", "truncating_timesteps",
                            "TIMESTEP_SPACINGS"),
    "diffusion.sampler": ("ddpm_step", "ddim_step", "ddpm_std", "sample", "VARIANCE_TYPES", "SAMPLERS"),
    "diffusion.variance": ("ddpm_variance", "ddim_variance"),
    "diffusion.vlb": ("q_posterior_mean",),
    "diffusion.guidance": ("cfg", "guidance_scale_to_w", "w_to_guidance_scale", "rescale_noise_cfg",
                           "classifier_guided_eps"),
    "nn.embedding": ("timestep_embedding_forward", "timestep_embedding_backward"),
    "model.config": ("UNetConfig", "get_preset", "from_diffusers_config", "to_diffusers_config"),
    "model.unet": ("unet_forward", "unet_backward", "unet_apply", "init_params"),
    "model.pretrained": ("load_pretrained", "save_pretrained"),
    "training.trainer": ("train",),
    "training.config": ("TrainConfig", "SampleConfig"),
    "training.generate": ("generate",),
    "training.bundle": ("load_bundle",),
    "fixtures": ("write_fixtures", "build_fixtures"),
    "oracle": ("check",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["__version__", *_WHERE]


def __getattr__(name):
    import importlib
    if name not in _WHERE:
        raise AttributeError(f"module 'minidiff' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
