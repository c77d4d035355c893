"""A plain NumPy DDPM / DDIM written from the papers without minidiff: the second implementation that
tests/test_oracle.py checks with `minidiff oracle` (and plants the classic bugs into, line by line)."""

import numpy as np

T = 1000
betas = np.linspace(1e-4, 0.02, T)
alphas_cumprod = np.cumprod(1.0 - betas)


def abar(t):  # abar_t, and 1 "before the start" (t < 0)
    return alphas_cumprod[t] if t >= 0 else 1.0


class PlainDDPM:
    conventions = {"prev_timestep": "t_minus_T_over_n"}  # prev_timesteps below is DDIMScheduler's rule

    def schedule(self, beta_schedule, num_train_timesteps, beta_start, beta_end):
        if beta_schedule != "linear":
            raise NotImplementedError(beta_schedule)
        b = np.linspace(beta_start, beta_end, num_train_timesteps)
        a = np.cumprod(1 - b)
        a_prev = np.append(1.0, a[:-1])
        var = b * (1 - a_prev) / (1 - a)
        return {"betas": b, "alphas_cumprod": a, "posterior_variance": var,
                "posterior_log_variance_clipped": np.log(np.append(var[1], var[1:]))}

    def add_noise(self, x0, noise, t):
        return np.sqrt(abar(t)) * x0 + np.sqrt(1 - abar(t)) * noise

    def posterior(self, x0, x_t, t):
        a, a_prev = abar(t), abar(t - 1)
        mean = (np.sqrt(a_prev) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - a_prev) * x_t) / (1 - a)
        var = betas[t] * (1 - a_prev) / (1 - a)
        return mean, var, np.log(var if t > 0 else self.posterior(x0, x_t, 1)[1])

    def ddpm_step(self, model_output, t, prev_t, sample, noise, prediction_type, variance_type, clip_sample):
        if prediction_type != "epsilon" or variance_type not in ("fixed_small", "fixed_large"):
            raise NotImplementedError(f"{prediction_type}, {variance_type}")
        a, a_prev = abar(t), abar(prev_t)
        beta = 1 - a / a_prev
        x0 = (sample - np.sqrt(1 - a) * model_output) / np.sqrt(a)
        if clip_sample:
            x0 = np.clip(x0, -1, 1)
        mean = (np.sqrt(a_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - a_prev) * sample) / (1 - a)
        var = beta * (1 - a_prev) / (1 - a) if variance_type == "fixed_small" else beta
        if t > 0:
            mean = mean + np.sqrt(var) * noise
        return mean, x0

    def ddim_step(self, model_output, t, prev_t, sample, noise, eta, prediction_type, set_alpha_to_one, clip_sample):
        if prediction_type != "epsilon":
            raise NotImplementedError(prediction_type)
        a, a_prev = abar(t), (abar(prev_t) if prev_t >= 0 or set_alpha_to_one else alphas_cumprod[0])
        x0 = (sample - np.sqrt(1 - a) * model_output) / np.sqrt(a)
        if clip_sample:
            x0 = np.clip(x0, -1, 1)
        eps = (sample - np.sqrt(a) * x0) / np.sqrt(1 - a)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        return np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noise, x0

    def timesteps(self, num_inference_steps, timestep_spacing, steps_offset):
        if timestep_spacing != "leading":
            raise NotImplementedError(timestep_spacing)
        return np.arange(num_inference_steps)[::-1] * (T // num_inference_steps) + steps_offset

    def prev_timesteps(self, timesteps, num_train_timesteps, num_inference_steps):
        return timesteps - num_train_timesteps // num_inference_steps

    def timestep_embedding(self, t, dim, flip_sin_to_cos, downscale_freq_shift):
        if flip_sin_to_cos or downscale_freq_shift != 1:
            raise NotImplementedError("only the DDPM code's [sin, cos] with / (half - 1)")
        half = dim // 2
        a = t[:, None] * np.exp(-np.log(10000) * np.arange(half) / (half - 1))[None]
        emb = np.concatenate([np.sin(a), np.cos(a)], axis=1)
        return np.pad(emb, ((0, 0), (0, dim % 2)))

    def cfg(self, eps_uncond, eps_cond, guidance_scale):
        w = guidance_scale - 1  # Ho & Salimans' w
        return (1 + w) * eps_cond - w * eps_uncond
