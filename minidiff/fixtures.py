"""`minidiff fixtures --out DIR`: float64 reference values for testing another implementation.

Each group of fixtures is one np.savez_compressed file of numeric (and a few str) arrays, loadable
with np.load(path, allow_pickle=False); DIR/README.md lists every key with its shape and dtype.
Keys are dotted paths: "<case>.<field>", e.g. "ddpm.epsilon.fixed_small.skip.prev_sample".
Every input is drawn from a seeded np.random.default_rng on the host (fixtures_model.SEED), so the
files are the same on every machine up to the last bits of BLAS sums. docs/oracle.md shows how to
compare them in PyTorch.

Shape legend: T = num_train_timesteps = 1000; N = 2 batch; the step inputs are (N, C, H, W) = (2, 2, 3, 3).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .files import write_atomic
from .fixtures_likelihood import likelihood_fixtures
from .fixtures_readme import MEANINGS
from .fixtures_model import _rng, _scalar, nn_fixtures, unet_fixtures
from .fixtures_samplers import karras_fixtures
from .diffusion.guidance import cfg, classifier_guided_eps, guidance_scale_to_w, rescale_noise_cfg
from .diffusion.sampler import VARIANCE_TYPES, ddim_step, ddpm_std, ddpm_step
from .diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, make_schedule
from .nn.embedding import timestep_embedding_backward, timestep_embedding_forward
from .diffusion.timesteps import (TIMESTEP_SPACINGS, ddim_prev_timesteps, make_timesteps, prev_timesteps,
                                  truncating_timesteps)
from .diffusion.schedule import add_noise
from .diffusion.vlb import q_posterior_mean

T = 1000
STEP_SHAPE = (2, 2, 3, 3)  # (N, C, H, W) of every sampler-step fixture
BETA_RANGES = {"scaled_linear": (8.5e-4, 0.012)}  # (beta_start, beta_end); (1e-4, 0.02) for the others
SCHEDULE_FIELDS = ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                   "posterior_mean_coef1", "posterior_mean_coef2")
INFERENCE_STEPS = (1, 7, 13, 50)
STEP_CASES = {"skip": (500, 400), "consecutive": (10, 9), "last": (0, -1), "t1": (1, 0)}  # name: (t, prev_t)
DDIM_CASES = {"skip": (500, 400), "last": (20, -1)}
CLIP_CASES = ("skip", "consecutive", "t1", "last")  # each also as <case>_clip (clip_sample=True)
ETAS = {"eta_0": 0.0, "eta_0p5": 0.5, "eta_1": 1.0}
GUIDANCE_SCALES = {"s_0": 0.0, "s_1": 1.0, "s_3": 3.0, "s_7p5": 7.5}
RESCALES = {"phi_0": 0.0, "phi_0p5": 0.5, "phi_0p7": 0.7, "phi_1": 1.0}
EMB_T = np.array([0.0, 1.0, 10.0, 999.0, 3.5, 500.25])  # integer and fractional timesteps
EMB_DIMS = (7, 8, 9, 32)  # 7, 9: odd, one zero pad column
FORWARD_T = (0, 1, 10, 500, 999)  # add_noise and the posterior at these t (0 and T-1 included)


# ----------------------------------------------------------------------------- diffusion math


def schedule_fixtures() -> dict:
    """<beta_schedule>[.zero_snr].<field> for every beta_schedule, T = 1000, with and without
    rescale_betas_zero_snr; beta_start / beta_end are stored beside the arrays."""
    out = {}
    for name in BETA_SCHEDULES:
        b0, b1 = BETA_RANGES.get(name, (1e-4, 0.02))
        for zero_snr in (False, True):
            s = make_schedule(T, name, b0, b1, rescale_betas_zero_snr=zero_snr)
            key = name + (".zero_snr" if zero_snr else "")
            out[f"{key}.beta_start"], out[f"{key}.beta_end"] = _scalar(b0), _scalar(b1)
            for field in SCHEDULE_FIELDS:
                out[f"{key}.{field}"] = np.array(getattr(s, field))
    return out


def timestep_fixtures() -> dict:
    """<spacing>.n<n>.offset<o>.{timesteps, prev_timesteps, ddim_prev_timesteps} (int64, T = 1000);
    truncated.n<n>.{timesteps, prev_timesteps}: denoising-diffusion-pytorch's int(linspace(-1, T-1, n+1))."""
    out = {}
    for spacing in TIMESTEP_SPACINGS:
        for n in INFERENCE_STEPS:
            for offset in (0, 1):
                ts = make_timesteps(T, n, spacing, offset)
                key = f"{spacing}.n{n}.offset{offset}"
                out[f"{key}.timesteps"] = ts
                out[f"{key}.prev_timesteps"] = prev_timesteps(ts)
                out[f"{key}.ddim_prev_timesteps"] = ddim_prev_timesteps(ts, T, n)
    for n in INFERENCE_STEPS:
        out[f"truncated.n{n}.timesteps"], out[f"truncated.n{n}.prev_timesteps"] = truncating_timesteps(T, n)
    return out


def forward_fixtures() -> dict:
    """q_sample.t<t>.{x0, noise, t, x_t}: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps; posterior.t<t>.{x0, x_t,
    t, mean, variance, log_variance_clipped, log_variance_floor}: q(x_{t-1} | x_t, x_0) = N(mean, variance), with
    mean = coef1 x_0 + coef2 x_t and variance = beta~_t (DDPM eq. 7); at t = 0 (beta~ = 0) log_variance_clipped
    takes log beta~_1 (DDPM and improved-diffusion code) and log_variance_floor log(1e-20)
    (denoising-diffusion-pytorch's clamp). Linear schedule, T = 1000."""
    s, rng, out = make_schedule(T), _rng("forward"), {}
    for t in FORWARD_T:
        x0, noise, x_t = (rng.standard_normal(STEP_SHAPE) for _ in range(3))
        out.update({f"q_sample.t{t}.x0": x0, f"q_sample.t{t}.noise": noise, f"q_sample.t{t}.t": _scalar(t),
                    f"q_sample.t{t}.x_t": add_noise(s, x0, noise, t)})
        full = np.ones(STEP_SHAPE)
        out.update({f"posterior.t{t}.x0": x0, f"posterior.t{t}.x_t": x_t, f"posterior.t{t}.t": _scalar(t),
                    f"posterior.t{t}.mean": q_posterior_mean(s, x0, x_t, t),
                    f"posterior.t{t}.variance": full * s.posterior_variance[t],
                    f"posterior.t{t}.log_variance_clipped": full * s.posterior_log_variance_clipped[t],
                    f"posterior.t{t}.log_variance_floor": full * np.log(max(s.posterior_variance[t], 1e-20))})
    return out


def ddpm_fixtures() -> dict:
    """ddpm.<prediction_type>.<variance_type>.<case>.<field> on the linear schedule (T = 1000).
    Cases: skip (t 500 -> 400), consecutive (10 -> 9), last (0 -> -1, no noise), t1 (1 -> 0, the last
    noisy step), and each again as <case>_clip (clip_sample=True, clip_sample_range=1)."""
    s, rng, out = make_schedule(T), _rng("ddpm"), {}
    for pred in PREDICTION_TYPES:
        for vt in VARIANCE_TYPES:
            for case, (t, prev_t, clip) in {**{k: (*v, False) for k, v in STEP_CASES.items()},
                                             **{f"{k}_clip": (*STEP_CASES[k], True) for k in CLIP_CASES}}.items():
                x = rng.standard_normal(STEP_SHAPE)
                model_output = rng.standard_normal(STEP_SHAPE)
                predicted_variance = None
                if vt.startswith("learned"):  # 2C channels: the last C are the variance output
                    predicted_variance = (rng.uniform(0.01, 0.5, STEP_SHAPE) if vt == "learned"
                                          else rng.uniform(-1.0, 1.0, STEP_SHAPE))
                    model_output = np.concatenate([model_output, predicted_variance], axis=1)
                noise = rng.standard_normal(STEP_SHAPE)
                prev, x0 = ddpm_step(s, model_output, t, prev_t, x, noise, vt, pred, clip, 1.0)
                std = ddpm_std(s, t, prev_t, vt, predicted_variance, like=x) if t > 0 else np.zeros(())
                key = f"ddpm.{pred}.{vt}.{case}"
                out.update({f"{key}.sample": x, f"{key}.model_output": model_output, f"{key}.noise": noise,
                            f"{key}.t": _scalar(t), f"{key}.prev_t": _scalar(prev_t),
                            f"{key}.clip_sample": _scalar(clip), f"{key}.clip_sample_range": _scalar(1.0),
                            f"{key}.std": np.broadcast_to(std, STEP_SHAPE).copy(),
                            f"{key}.prev_sample": prev, f"{key}.pred_original_sample": x0})
    return out


def ddim_fixtures() -> dict:
    """ddim.<prediction_type>.<eta>.<alpha_one|alpha_bar0>.<case>.<field> on the linear schedule.
    Cases: skip (500 -> 400), last (20 -> -1, where set_alpha_to_one matters), skip_clip and last_clip
    (clip_sample=True and use_clipped_model_output=True)."""
    s, rng, out = make_schedule(T), _rng("ddim"), {}
    for pred in PREDICTION_TYPES:
        for eta_name, eta in ETAS.items():
            for final_name, alpha_one in (("alpha_one", True), ("alpha_bar0", False)):
                for case, (t, prev_t, clip) in {**{k: (*v, False) for k, v in DDIM_CASES.items()},
                                                 **{f"{k}_clip": (*v, True) for k, v in DDIM_CASES.items()}}.items():
                    x, model_output, noise = (rng.standard_normal(STEP_SHAPE) for _ in range(3))
                    prev, x0 = ddim_step(s, model_output, t, prev_t, x, eta, noise, alpha_one, pred, clip, 1.0, clip)
                    key = f"ddim.{pred}.{eta_name}.{final_name}.{case}"
                    out.update({f"{key}.sample": x, f"{key}.model_output": model_output, f"{key}.noise": noise,
                                f"{key}.t": _scalar(t), f"{key}.prev_t": _scalar(prev_t), f"{key}.eta": _scalar(eta),
                                f"{key}.set_alpha_to_one": _scalar(alpha_one), f"{key}.clip_sample": _scalar(clip),
                                f"{key}.use_clipped_model_output": _scalar(clip),
                                f"{key}.prev_sample": prev, f"{key}.pred_original_sample": x0})
    return out


def guidance_fixtures() -> dict:
    """cfg.<s>.out = eps_u + s (eps_c - eps_u) (and .w = s - 1); rescale.<phi>.out =
    rescale_noise_cfg(cfg.s_7p5.out, eps_c, phi); classifier.out = eps - sqrt(1 - abar_t) scale grad."""
    rng, out = _rng("guidance"), {}
    eps_u, eps_c = rng.standard_normal(STEP_SHAPE), rng.standard_normal(STEP_SHAPE)
    out.update({"cfg.eps_uncond": eps_u, "cfg.eps_cond": eps_c})
    for name, scale in GUIDANCE_SCALES.items():
        out.update({f"cfg.{name}.guidance_scale": _scalar(scale), f"cfg.{name}.w": _scalar(guidance_scale_to_w(scale)),
                    f"cfg.{name}.out": cfg(eps_u, eps_c, scale)})
    noise_cfg = out["cfg.s_7p5.out"]
    out.update({"rescale.noise_cfg": noise_cfg, "rescale.noise_pred_text": eps_c})
    for name, phi in RESCALES.items():
        out[f"rescale.{name}.guidance_rescale"] = _scalar(phi)
        out[f"rescale.{name}.out"] = rescale_noise_cfg(noise_cfg, eps_c, phi)
    eps, x_t, grad = (rng.standard_normal(STEP_SHAPE) for _ in range(3))
    t = np.array([100, 700])
    out.update({"classifier.eps": eps, "classifier.x_t": x_t, "classifier.t": t, "classifier.grad": grad,
                "classifier.classifier_scale": _scalar(2.5), "classifier.out": classifier_guided_eps(
                    make_schedule(T), eps, x_t, t, lambda x, t, y: grad, 2.5)})
    return out


def embedding_fixtures() -> dict:
    """temb.t (6,) and temb.flip<0|1>.shift<0|1>.dim<d>.{emb, demb, dt}: the sinusoidal embedding
    (max_period 10000, scale 1) in float64, an upstream gradient demb and dL/dt."""
    rng, out = _rng("embeddings"), {"temb.t": EMB_T.copy()}
    for flip in (0, 1):
        for shift in (0, 1):
            for dim in EMB_DIMS:
                emb, cache = timestep_embedding_forward(EMB_T, dim, bool(flip), float(shift), dtype=np.float64)
                demb = rng.standard_normal(emb.shape)
                key = f"temb.flip{flip}.shift{shift}.dim{dim}"
                out.update({f"{key}.emb": emb, f"{key}.demb": demb,
                            f"{key}.dt": timestep_embedding_backward(demb, cache)})
    return out


# file stem -> (builder, one-line description for the README)
GROUPS = {
    "schedules": (schedule_fixtures, "noise schedules: every beta_schedule, with and without zero-SNR rescaling"),
    "timesteps": (timestep_fixtures, "inference timestep lists and both previous-timestep rules"),
    "forward": (forward_fixtures, "the forward process q(x_t | x_0) (add_noise) and the posterior q(x_{t-1} | x_t, x_0)"),
    "ddpm_step": (ddpm_fixtures, "DDPM steps: every prediction_type x variance_type, injected noise"),
    "ddim_step": (ddim_fixtures, "DDIM steps: every prediction_type x eta x set_alpha_to_one, injected noise"),
    "karras": (karras_fixtures, "Euler, Euler ancestral, Heun, DPM-Solver++(2M): sigmas, timesteps and steps"),
    "guidance": (guidance_fixtures, "classifier-free guidance, guidance rescale, classifier guidance"),
    "embeddings": (embedding_fixtures, "sinusoidal timestep embeddings, every flip_sin_to_cos x shift"),
    "nn": (nn_fixtures, "forward/backward pairs of every nn op"),
    "unet": (unet_fixtures, "the tiny U-Net: weights, input, output, every parameter gradient and dx"),
    "likelihood": (likelihood_fixtures, "the variational bound's terms in bits/dim at several t for every variance "
                   "type, the KL, the 8-bit decoder, the prior, the hybrid loss and its gradient"),
}


def build_fixtures(groups=None) -> dict:
    """{file stem: {key: array}} for the named groups (default: all of GROUPS)."""
    names = list(GROUPS) if groups is None else list(groups)
    for name in names:
        if name not in GROUPS:
            raise ValueError(f"groups must be names from {list(GROUPS)}, got {name!r}")
    return {name: GROUPS[name][0]() for name in names}


def readme_text(fixtures: dict) -> str:
    """README.md of a fixture folder: each file, what it holds, and every key (case + field) with its shape."""
    lines = ["# minidiff fixtures", "",
             "Float64 reference values written by `minidiff fixtures`. Load each file with",
             "`np.load(path, allow_pickle=False)`. A key is `<case>.<field>`: each table row is one case, listing",
             "its fields as `field shape` (dtype float64 unless named). How to compare them in PyTorch, with a",
             "tolerance per item: docs/oracle.md in the minidiff repository.", "",
             f"T = {T} everywhere; sampler steps use the `linear` schedule (`schedules.npz`: `linear.*`) and",
             f"(N, C, H, W) = {STEP_SHAPE}; prev_t = -1 means 'before the start'.", ""]
    for name, arrays in fixtures.items():
        builder, title = GROUPS[name]
        cases = {}
        for k, v in arrays.items():
            case, _, field = k.rpartition(".")
            dtype = "" if v.dtype == np.float64 else f" {v.dtype}"
            cases.setdefault(case, []).append(f"`{field}` {tuple(v.shape)}{dtype}")
        lines += [f"## {name}.npz: {title}", "", MEANINGS[name], "", " ".join(builder.__doc__.split()), "",
                  "| case | fields |", "|---|---|"]
        lines += [f"| `{case or '(top level)'}` | {', '.join(fields)} |" for case, fields in cases.items()]
        lines.append("")
    return "\n".join(lines)


def write_fixtures(out_dir, groups=None) -> list:
    """Write <group>.npz for each group and README.md into out_dir (created if missing); each file
    is written to a temporary file and moved into place. Returns the written paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir must be a directory, got the file {out}")
    out.mkdir(parents=True, exist_ok=True)
    fixtures = build_fixtures(groups)
    paths = []
    for name, arrays in fixtures.items():
        path = out / f"{name}.npz"
        write_atomic(path, lambda f, a=arrays: np.savez_compressed(f, **a))
        paths.append(path)
    readme = out / "README.md"
    write_atomic(readme, lambda f: f.write(readme_text(fixtures).encode()))
    return paths + [readme]


def add_fixtures_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `fixtures` subcommand on an argparse subparsers object; returns its parser."""
    p = subparsers.add_parser("fixtures", help="write float64 reference values (.npz) for testing another "
                                               "implementation (see docs/oracle.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the .npz files and README.md into")
    p.add_argument("--only", nargs="+", choices=list(GROUPS), default=None, help="write only these groups")
    p.set_defaults(func=cmd_fixtures)
    return p


def cmd_fixtures(args) -> int:
    paths = write_fixtures(args.out, args.only)
    size = sum(p.stat().st_size for p in paths)
    print(f"wrote {len(paths)} files ({size / 1e6:.2f} MB) to {args.out}: {', '.join(p.name for p in paths)}")
    return 0
