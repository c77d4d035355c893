"""The cases of `minidiff oracle` (oracle.py): one builder per adapter function, each turning fixture
keys into Case objects (the call, the expected fields, and the known alternative conventions, computed
by minidiff's own functions only when a case fails).

Shape legend: T = 1000; step arrays (N, C, H, W) = (2, 2, 3, 3); timestep lists (n,).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .diffusion.guidance import cfg
from .diffusion.sampler import ddim_step, ddpm_step
from .diffusion.schedule import make_schedule
from .fixtures import FORWARD_T, SCHEDULE_FIELDS, T, build_fixtures

@dataclass
class Case:
    """One call of an adapter function and what it must return. expected: {field: array}; alternatives:
    [(convention, value, compute() -> {field: array})], computed only when the case fails."""
    name: str
    function: str
    args: tuple
    kwargs: dict
    expected: dict
    kind: str
    alternatives: tuple = ()
    broadcast: tuple = ()  # fields whose output may broadcast to the expected shape


GROUP_OF = {"schedule": "schedules", "add_noise": "forward", "posterior": "forward", "ddpm_step": "ddpm_step",
            "ddim_step": "ddim_step", "timesteps": "timesteps", "prev_timesteps": "timesteps",
            "timestep_embedding": "embeddings", "cfg": "guidance", "unet_forward": "unet", "unet_backward": "unet"}


def _case(arrays, prefix):
    return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}


def _prefixes(arrays, depth):
    return sorted({".".join(k.split(".")[:depth]) for k in arrays})


def schedule_cases(fx):
    """The schedule cases: betas, alphas_cumprod and the posterior terms of each beta_schedule at T steps."""
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"):
        c = _case(fx["schedules"], name)
        pv = c["posterior_variance"]
        yield Case(f"schedule.{name}", "schedule", (name, T, float(c["beta_start"]), float(c["beta_end"])), {},
                   {f: c[f] for f in SCHEDULE_FIELDS}, "schedule",
                   (("posterior_log_variance_t0", "floor_1e-20",
                     lambda pv=pv: {"posterior_log_variance_clipped": np.log(np.maximum(pv, 1e-20))}),))


def add_noise_cases(fx):
    """The q_sample cases: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at the fixtures' timesteps."""
    for t in FORWARD_T:
        c = _case(fx["forward"], f"q_sample.t{t}")
        yield Case(f"add_noise.t{t}", "add_noise", (c["x0"], c["noise"], t), {}, {"x_t": c["x_t"]}, "step")


def posterior_cases(fx):
    """The posterior cases: mean mu~_t(x_t, x_0), variance beta~_t and its log, at the fixtures' timesteps."""
    for t in FORWARD_T:
        c = _case(fx["forward"], f"posterior.t{t}")
        alts = (("posterior_log_variance_t0", "floor_1e-20", lambda c=c: {"log_variance": c["log_variance_floor"]}),)
        yield Case(f"posterior.t{t}", "posterior", (c["x0"], c["x_t"], t), {},
                   {"mean": c["mean"], "variance": c["variance"], "log_variance": c["log_variance_clipped"]}, "step",
                   alts if t == 0 else (), broadcast=("variance", "log_variance"))


def ddpm_cases(fx):
    """The DDPM step cases (DDPM Alg. 2): x_prev and x0^ per prediction type, variance type, skip and clip."""
    s = make_schedule(T)
    for key in _prefixes(fx["ddpm_step"], 4):
        c, (_, pred, vt, _) = _case(fx["ddpm_step"], key), key.split(".")
        t, prev_t, clip = int(c["t"]), int(c["prev_t"]), bool(c["clip_sample"])
        args = (c["model_output"], t, prev_t, c["sample"], c["noise"])

        def alt(vt=vt, clip=clip, args=args):
            prev, x0 = ddpm_step(s, args[0], args[1], args[2], args[3], args[4], vt, pred, clip, 1.0)
            return {"prev_sample": prev, "pred_original_sample": x0}
        alts = [("clip_sample", not clip, lambda f=alt, clip=clip: f(clip=not clip))]
        if vt in ("fixed_small", "fixed_large"):
            other = "fixed_large" if vt == "fixed_small" else "fixed_small"
            alts.insert(0, ("variance_type", other, lambda f=alt, o=other: f(vt=o)))
        yield Case(key, "ddpm_step", args, dict(prediction_type=pred, variance_type=vt, clip_sample=clip),
                   {"prev_sample": c["prev_sample"], "pred_original_sample": c["pred_original_sample"]}, "step",
                   tuple(alts))


def ddim_cases(fx):
    """The DDIM step cases (DDIM eq. 12): x_prev and x0^ per prediction type, eta, skip and clip."""
    s = make_schedule(T)
    for key in _prefixes(fx["ddim_step"], 5):
        c, pred = _case(fx["ddim_step"], key), key.split(".")[1]
        t, prev_t, clip, one = int(c["t"]), int(c["prev_t"]), bool(c["clip_sample"]), bool(c["set_alpha_to_one"])
        args, eta = (c["model_output"], t, prev_t, c["sample"], c["noise"]), float(c["eta"])

        def alt(one=one, clip=clip, args=args, eta=eta):
            prev, x0 = ddim_step(s, args[0], args[1], args[2], args[3], eta, args[4], one, pred, clip, 1.0, clip)
            return {"prev_sample": prev, "pred_original_sample": x0}
        alts = [("clip_sample", not clip, lambda f=alt, clip=clip: f(clip=not clip))]
        if prev_t < 0:
            alts.append(("set_alpha_to_one", not one, lambda f=alt, one=one: f(one=not one)))
        yield Case(key, "ddim_step", args, dict(eta=eta, prediction_type=pred, set_alpha_to_one=one, clip_sample=clip),
                   {"prev_sample": c["prev_sample"], "pred_original_sample": c["pred_original_sample"]}, "step",
                   tuple(alts))


def _timestep_keys(fx):
    return [k for k in _prefixes(fx["timesteps"], 3) if not k.startswith("truncated")]


def timesteps_cases(fx):
    """The inference-timestep cases: each spacing's emitted timesteps for n steps of T."""
    for key in _timestep_keys(fx):
        c, (spacing, n, offset) = _case(fx["timesteps"], key), key.split(".")
        n, offset = int(n[1:]), int(offset[len("offset"):])
        trunc = fx["timesteps"][f"truncated.n{n}.timesteps"]
        alts = ((("timestep_spacing", "truncated", lambda trunc=trunc: {"timesteps": trunc}),)
                if spacing == "trailing" and offset == 0 else ())
        yield Case(f"timesteps.{key}", "timesteps", (n, spacing, offset), {}, {"timesteps": c["timesteps"]}, "int",
                   alts)


def prev_timesteps_cases(fx):
    """The previous-timestep cases: the next-entry rule for each emitted timestep list."""
    for key in _timestep_keys(fx):
        c, n = _case(fx["timesteps"], key), int(key.split(".")[1][1:])
        yield Case(f"prev_timesteps.{key}", "prev_timesteps", (c["timesteps"].copy(), T, n), {},
                   {"prev_timesteps": c["prev_timesteps"]}, "int",
                   (("prev_timestep", "t_minus_T_over_n", lambda c=c: {"prev_timesteps": c["ddim_prev_timesteps"]}),))


def embedding_cases(fx):
    """The sinusoidal-embedding cases: each flip_sin_to_cos / downscale_freq_shift / dim of the fixtures."""
    e = fx["embeddings"]
    for key in _prefixes({k: v for k, v in e.items() if k != "temb.t"}, 4):
        _, flip, shift, dim = key.split(".")
        flip, shift, dim = int(flip[4:]), int(shift[5:]), int(dim[3:])
        other_flip, other_shift = f"temb.flip{1 - flip}.shift{shift}.dim{dim}", f"temb.flip{flip}.shift{1 - shift}.dim{dim}"
        alts = (("flip_sin_to_cos", not flip, lambda k=other_flip: {"emb": e[f"{k}.emb"]}),
                ("downscale_freq_shift", 1 - shift, lambda k=other_shift: {"emb": e[f"{k}.emb"]}))
        yield Case(key, "timestep_embedding", (e["temb.t"].copy(), dim, bool(flip), shift), {},
                   {"emb": e[f"{key}.emb"]}, "embedding", alts)


def cfg_cases(fx):
    """The guidance cases: eps = eps_uncond + s (eps_cond - eps_uncond) at the fixtures' scales s."""
    g = fx["guidance"]
    for key in sorted({k.rsplit(".", 1)[0] for k in g if k.startswith("cfg.s_")}):
        u, c, s = g["cfg.eps_uncond"], g["cfg.eps_cond"], float(g[f"{key}.guidance_scale"])
        yield Case(key, "cfg", (u, c, s), {}, {"out": g[f"{key}.out"]}, "cfg",
                   (("guidance_scale", "w", lambda u=u, c=c, s=s: {"out": cfg(u, c, s + 1.0)}),))


def unet_cases(fx, which):
    """The U-Net case of which: unet_forward's output y, or unet_backward's gradients and dx for the upstream dy."""
    u = fx["unet"]
    params = {k[len("param."):]: v for k, v in u.items() if k.startswith("param.")}
    if which == "unet_forward":
        yield Case("unet.forward", which, (params, u["x"], u["t"]), {}, {"y": u["y"]}, "unet")
    else:
        grads = {"x": u["dx"], **{k[len("grad."):]: v for k, v in u.items() if k.startswith("grad.")}}
        yield Case("unet.backward", which, (params, u["x"], u["t"], u["dy"]), {}, grads, "grad")


BUILDERS = {"schedule": schedule_cases, "add_noise": add_noise_cases, "posterior": posterior_cases,
            "ddpm_step": ddpm_cases, "ddim_step": ddim_cases, "timesteps": timesteps_cases,
            "prev_timesteps": prev_timesteps_cases, "timestep_embedding": embedding_cases, "cfg": cfg_cases,
            "unet_forward": lambda fx: unet_cases(fx, "unet_forward"),
            "unet_backward": lambda fx: unet_cases(fx, "unet_backward")}


def build_cases(functions, fixtures=None):
    """Every Case for the named adapter functions; fixture groups not in `fixtures` are built here."""
    fx = dict(fixtures or {})
    need = sorted({GROUP_OF[f] for f in functions} - set(fx))
    fx.update(build_fixtures(need) if need else {})
    return [case for f in functions for case in BUILDERS[f](fx)]
