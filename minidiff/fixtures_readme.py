"""What each fixture file's arrays mean in the papers' notation: one paragraph per file of
`minidiff fixtures`' README.md (fixtures.readme_text). t is 0-indexed (t = 0 is the paper's t = 1)."""

MEANINGS = {
    "schedules": "`betas` is beta_t; `alphas_cumprod` is abar_t = prod_{s<=t} (1 - beta_s); `posterior_variance` is "
                 "beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t) (DDPM eq. 7, 0 at t = 0); "
                 "`posterior_log_variance_clipped` is log beta~_t with its t = 0 entry replaced by log beta~_1; "
                 "`posterior_mean_coef1/2` are the coefficients of x_0 and x_t in mu~_t(x_t, x_0).",
    "timesteps": "`timesteps` are the t visited by a sampler, in order; `prev_timesteps` the t it steps to (the next "
                 "entry, -1 = before the start); `ddim_prev_timesteps` DDIMScheduler's t - T // n; `truncated.*` "
                 "denoising-diffusion-pytorch's int(linspace(-1, T-1, n+1)) list and its pairs.",
    "forward": "`q_sample`: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with `x0` = x_0, `noise` = eps (DDPM eq. 4). "
               "`posterior`: q(x_{t-1} | x_t, x_0) = N(`mean`, `variance`) = N(mu~_t, beta~_t I) (DDPM eqs. 6-7); "
               "at t = 0 `log_variance_clipped` = log beta~_1 and `log_variance_floor` = log(1e-20).",
    "ddpm_step": "`sample` is x_t, `model_output` the network's eps (or x_0, or v) at t, `noise` is z; "
                 "`pred_original_sample` is x0^ (DDPM eq. 15, clipped when clip_sample); `std` is sigma_t; "
                 "`prev_sample` is x_{prev_t} = mu~(x_t, x0^) + sigma_t z, with no noise at t = 0 (Algorithm 2).",
    "ddim_step": "As ddpm_step, with x_prev = sqrt(abar_prev) x0^ + sqrt(1 - abar_prev - sigma_t^2) eps^ + sigma_t z, "
                 "sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev)) (DDIM eqs. 12, 16); "
                 "abar_prev before the start is 1 (set_alpha_to_one) or abar_0.",
    "karras": "sigma = sqrt((1 - abar) / abar) (the VE noise level); `sigmas` end with 0; each step is Karras et al.'s "
              "update of x in sigma coordinates from the model output at the scaled input x / sqrt(sigma^2 + 1).",
    "guidance": "`cfg`: eps~ = eps_u + s (eps_c - eps_u) with `guidance_scale` s and `w` = s - 1 (Ho & Salimans); "
                "`rescale`: Lin et al.'s std-matched mix with phi; `classifier`: eps^ - sqrt(1 - abar_t) scale grad "
                "log p(y | x_t) (Dhariwal & Nichol, Algorithm 2).",
    "embeddings": "`emb` is the sinusoidal embedding of `temb.t`: [sin(t f_k), cos(t f_k)] (flip 0) or [cos, sin] "
                  "(flip 1), f_k = exp(-ln(10000) k / (half - shift)); `demb` an upstream gradient, `dt` dL/dt.",
    "nn": "Each op's inputs, its output `y`, an upstream gradient `dy`, and d<input> = the gradient of L = sum(dy * y).",
    "unet": "eps_theta(x_t, t) of the tiny U-Net: `param.*` theta by state-dict name, `x` = x_t, `t`, `y` = the output; "
            "`dy`, `dx` and `grad.*` the gradients of L = sum(dy * y).",
    "likelihood": "The variational bound's terms L_t in bits/dim (DDPM eq. 5): KL(q(x_{t-1} | x_t, x_0) || "
                  "p(x_{t-1} | x_t)) for t > 0, the discretized decoder -log p(x_0 | x_1) at t = 0, the prior "
                  "KL(q(x_T | x_0) || N(0, I)), and the hybrid loss L_simple + lambda L_vlb.",
}
