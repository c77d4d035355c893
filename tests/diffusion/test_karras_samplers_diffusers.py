"""Euler, Euler ancestral, Heun and DPM-Solver++(2M) against diffusers' schedulers in float64, step by
step and over whole loops, with the same injected noise: max relative error < 1e-10.

diffusers 0.42 keeps parts of these schedulers in float32 even when fed float64: betas from a float32
linspace, timesteps and sigmas cast with astype(np.float32), the sample cast to float32 at the start of
Euler's, Euler ancestral's and DPM-Solver's step. As shipped, its Karras trajectories differ from float64
ones by up to ~2e-5. To compare in float64 we switch those casts off INSIDE the scheduler modules under
test: their module globals `torch` and `np` are replaced by proxies whose float32 attribute is float64
(everything else is the real module), so every float32 in them becomes float64 (docs/conventions.md).
The Euler-family noise is injected by replacing the module's randn_tensor.
"""

import numpy as np
import pytest

from minidiff.diffusion import schedule as S
from minidiff.diffusion.karras_samplers import (HeunHalf, dpmsolver_pp_2m_step, euler_ancestral_step, euler_step,
                                                heun_step, scale_model_input)
from minidiff.diffusion.karras_sampling import sample_karras
from minidiff.diffusion.sigmas import init_noise_sigma, make_sigmas

SHAPE = (2, 2, 3, 3)
CLASSES = {"euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
           "heun": "HeunDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}
MODULES = {"euler": "scheduling_euler_discrete", "euler_a": "scheduling_euler_ancestral_discrete",
           "heun": "scheduling_heun_discrete", "dpm++2m": "scheduling_dpmsolver_multistep"}


class _Float64(object):
    """A module proxy: float32 -> float64, every other attribute from the real module."""

    def __init__(self, module):
        self._module, self.float32 = module, module.float64

    def __getattr__(self, name):
        return getattr(self._module, name)


def undouble(a, sampler, tail=False):
    """Heun's interleaved list [a0, a1, a1, a2, a2, ...(, a_last)] -> [a0, a1, a2, ...(, a_last)]."""
    if sampler != "heun":
        return a
    return np.concatenate([a[:1], a[1:-1:2], a[-1:]]) if tail else np.concatenate([a[:1], a[1::2]])


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def diffusers_scheduler(monkeypatch, sampler, karras, prediction_type, spacing="linspace"):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    import importlib

    mod = importlib.import_module(f"diffusers.schedulers.{MODULES[sampler]}")
    monkeypatch.setattr(mod, "torch", _Float64(torch))
    monkeypatch.setattr(mod, "np", _Float64(np))
    kw = dict(prediction_type=prediction_type, timestep_spacing=spacing, beta_schedule="linear", beta_start=1e-4,
              beta_end=0.02)  # HeunDiscreteScheduler defaults to (8.5e-4, 0.012)
    if sampler != "euler_a":
        kw["use_karras_sigmas"] = karras
    sch = getattr(mod, CLASSES[sampler])(**kw)
    return torch, mod, sch


def gaussian_model(schedule_sigmas_t, ptype, mu=0.3, sd=0.7):
    """A smooth stand-in for a network: the exact output of each prediction type for N(mu, sd^2) data,
    at the noise level sigma(t) = exp(interp(t, [0..T-1], log sigma_t)) (any smooth function of (x, t) will do)."""
    log_sig = np.log(schedule_sigmas_t)

    def model_fn(x, t, cond):
        s = np.exp(np.interp(np.asarray(t, np.float64), np.arange(len(log_sig)), log_sig)).reshape(-1, 1, 1, 1)
        a = 1 / (1 + s**2)
        sig2 = a * sd**2 + 1 - a
        e = np.sqrt(1 - a) * (x - np.sqrt(a) * mu) / sig2
        x0 = mu + np.sqrt(a) * sd**2 / sig2 * (x - np.sqrt(a) * mu)
        return {"epsilon": e, "v_prediction": np.sqrt(a) * e - np.sqrt(1 - a) * x0, "sample": x0}[ptype]
    return model_fn


CASES = [(s, k, p, n) for s in CLASSES for k in (False, True) for p in ("epsilon", "v_prediction") for n in (10, 25)]


@pytest.mark.parametrize("sampler,karras,ptype,n", CASES)
def test_whole_loop_and_every_step_match_diffusers(monkeypatch, sampler, karras, ptype, n):
    """diffusers' loop (scale_model_input, model, step) against sample_karras with the same x_T and noises;
    and every one of diffusers' steps against ours from diffusers' own input (step by step)."""
    torch, mod, sch = diffusers_scheduler(monkeypatch, sampler, karras, ptype)
    sched = S.make_schedule(1000)
    sch.set_timesteps(n)
    if sampler == "euler_a" and karras:      # diffusers' Euler ancestral has no Karras option: give it the sigmas
        sch.timesteps, sigmas = (torch.from_numpy(a) for a in make_sigmas(sched, n, "euler_a", True))
        sch.sigmas = sigmas
    ts, sg = make_sigmas(sched, n, sampler, karras)
    np.testing.assert_allclose(sg, undouble(sch.sigmas.numpy(), sampler, tail=True), rtol=1e-12, atol=0)
    np.testing.assert_allclose(ts, undouble(sch.timesteps.numpy(), sampler), rtol=1e-12, atol=1e-9)
    assert init_noise_sigma(sg, sampler) == pytest.approx(float(sch.init_noise_sigma), rel=1e-14)

    model_fn = gaussian_model(np.sqrt((1 - sched.alphas_cumprod) / sched.alphas_cumprod), ptype)
    rng = np.random.default_rng(n)
    z = rng.standard_normal(SHAPE)
    noises = rng.standard_normal((n,) + SHAPE)
    draws = iter(noises)
    monkeypatch.setattr(mod, "randn_tensor", lambda *a, **k: torch.from_numpy(next(draws)), raising=False)

    x = torch.from_numpy(z) * sch.init_noise_sigma
    worst_step, half, history, k = 0.0, None, (), 0
    for j, t in enumerate(sch.timesteps):
        x_in = sch.scale_model_input(x, t)
        sigma = float(sch.sigmas[j if sampler == "dpm++2m" else sch.step_index])  # DPM: step_index set by step()
        np.testing.assert_allclose(scale_model_input(x.numpy(), sigma, sampler), x_in.numpy(), rtol=1e-14)
        out = model_fn(x_in.numpy(), np.full(SHAPE[0], float(t)), None)
        new = sch.step(torch.from_numpy(out), t, x).prev_sample.numpy()
        if sampler == "euler":
            ours, _ = euler_step(out, sg[j], sg[j + 1], x.numpy(), ptype)
        elif sampler == "euler_a":
            ours, _ = euler_ancestral_step(out, sg[j], sg[j + 1], x.numpy(), noises[j], ptype)
        elif sampler == "heun":
            i = (j + 1) // 2
            if half is None:
                ours, _, half = heun_step(out, sg[i], sg[i + 1], x.numpy(), None, ptype)
                half = half if sg[i + 1] > 0 else None
            else:
                ours, _, half = heun_step(out, sg[i - 1], sg[i], x.numpy(), half, ptype)
        else:
            lower = n < 15 and j == n - 1
            ours, _, history = dpmsolver_pp_2m_step(out, sg[j], sg[j + 1], x.numpy(), history, ptype, lower)
        worst_step = max(worst_step, rel(ours, new))
        x = torch.from_numpy(new)
        k += 1
    assert worst_step < 1e-10
    mine = sample_karras(model_fn, SHAPE, sched, sampler, n, karras, prediction_type=ptype, x_T=z,
                         noises=noises, dtype=np.float64)
    assert rel(mine, x.numpy()) < 1e-10
    assert k == (2 * n - 1 if sampler == "heun" else n)
    assert isinstance(HeunHalf(0, 0.0, 0), tuple)


@pytest.mark.parametrize("sampler", list(CLASSES))
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_timestep_spacings_match_diffusers(monkeypatch, sampler, spacing):
    torch, mod, sch = diffusers_scheduler(monkeypatch, sampler, False, "epsilon", spacing)
    sched = S.make_schedule(1000)
    for n in (1, 7, 10, 25, 61):
        sch.set_timesteps(n)
        ts, sg = make_sigmas(sched, n, sampler, timestep_spacing=spacing)
        np.testing.assert_allclose(ts, undouble(sch.timesteps.numpy(), sampler)[:n], atol=0)
        assert init_noise_sigma(sg, sampler, spacing) == pytest.approx(float(sch.init_noise_sigma), rel=1e-14)
