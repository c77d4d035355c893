"""The fixtures issue 19 added, each against the published formula and, where installed, diffusers / torch:
q_sample and the posterior (both t = 0 log-variance conventions), DDPM at t = 1 and the clipped cases,
DDIM's last step with clip, odd embedding dims, the truncating DDIM spacing; and diffusers' DDPMScheduler /
DDIMScheduler checked through minidiff.oracle with <= 20 lines of adapter glue each."""

import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from minidiff.fixtures import FORWARD_T, build_fixtures
from minidiff.oracle import check

FX = build_fixtures(["forward", "ddpm_step", "ddim_step", "embeddings", "timesteps"])
BETAS = np.linspace(1e-4, 0.02, 1000)  # the published linear schedule, written out again
ABAR = np.cumprod(1 - BETAS)


def group(arrays, prefix):
    return {k[len(prefix) + 1:]: v for k, v in arrays.items() if k.startswith(prefix + ".")}


def test_q_sample_and_posterior_by_the_formulas():
    for t in FORWARD_T:
        c = group(FX["forward"], f"q_sample.t{t}")
        np.testing.assert_allclose(c["x_t"], np.sqrt(ABAR[t]) * c["x0"] + np.sqrt(1 - ABAR[t]) * c["noise"],
                                   rtol=1e-13, atol=1e-14)  # DDPM eq. 4
        p = group(FX["forward"], f"posterior.t{t}")
        a_prev = ABAR[t - 1] if t > 0 else 1.0
        mean = (np.sqrt(a_prev) * BETAS[t] * p["x0"] + np.sqrt(1 - BETAS[t]) * (1 - a_prev) * p["x_t"]) / (1 - ABAR[t])
        var = BETAS[t] * (1 - a_prev) / (1 - ABAR[t])  # DDPM eq. 7
        np.testing.assert_allclose(p["mean"], mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(p["variance"], var, rtol=1e-12, atol=0)
        var1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
        np.testing.assert_allclose(p["log_variance_clipped"], np.log(var if t > 0 else var1), rtol=1e-12)
        np.testing.assert_allclose(p["log_variance_floor"], np.log(var if t > 0 else 1e-20), rtol=1e-12)
    assert group(FX["forward"], "posterior.t0")["log_variance_floor"].max() == np.log(1e-20)


def test_ddpm_t1_carries_its_noise():
    """1 -> 0 is the last noisy step: sigma = sqrt(beta~_1) = 0.0074 (fixed_small), sqrt(beta_1) (fixed_large)."""
    c = group(FX["ddpm_step"], "ddpm.epsilon.fixed_small.t1")
    assert (int(c["t"]), int(c["prev_t"])) == (1, 0)
    var1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    np.testing.assert_allclose(c["std"], np.sqrt(var1), rtol=1e-12)
    assert abs(np.sqrt(var1) - 0.0074) < 1e-4
    x0 = (c["sample"] - np.sqrt(1 - ABAR[1]) * c["model_output"]) / np.sqrt(ABAR[1])
    mean = (np.sqrt(ABAR[0]) * BETAS[1] * x0 + np.sqrt(1 - BETAS[1]) * (1 - ABAR[0]) * c["sample"]) / (1 - ABAR[1])
    np.testing.assert_allclose(c["prev_sample"], mean + np.sqrt(var1) * c["noise"], rtol=1e-11, atol=1e-12)
    c = group(FX["ddpm_step"], "ddpm.epsilon.fixed_small.t1_clip")
    assert c["pred_original_sample"].max() <= 1 and c["pred_original_sample"].min() >= -1 and bool(c["clip_sample"])


def test_odd_dim_and_truncated_spacing_by_the_formulas():
    e = FX["embeddings"]
    t = e["temb.t"]
    a = t[:, None] * np.exp(-np.log(10000) * np.arange(3) / 2)[None]  # dim 7: half 3, shift 1
    np.testing.assert_allclose(e["temb.flip0.shift1.dim7.emb"], np.concatenate([np.sin(a), np.cos(a), 0 * t[:, None]], 1),
                               rtol=0, atol=1e-12)
    ts = FX["timesteps"]
    for n in (1, 7, 13, 50):
        times = [int(v) for v in np.linspace(-1, 999, n + 1)][::-1]
        assert ts[f"truncated.n{n}.timesteps"].tolist() == times[:-1]
        assert ts[f"truncated.n{n}.prev_timesteps"].tolist() == times[1:]
    assert ts["truncated.n7.timesteps"].tolist() != ts["trailing.n7.offset0.timesteps"].tolist()  # 427 vs 428


def test_new_keys_match_torch_and_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding
    for n in (1, 7, 13, 50):  # denoising-diffusion-pytorch's line, in torch's float32 linspace
        times = list(reversed(torch.linspace(-1, 999, steps=n + 1).int().tolist()))
        assert FX["timesteps"][f"truncated.n{n}.timesteps"].tolist() == times[:-1]
    for key in ("temb.flip0.shift1.dim7", "temb.flip1.shift0.dim7"):
        ref = get_timestep_embedding(torch.tensor(FX["embeddings"]["temb.t"]), 7, "flip1" in key, int(key[-6]))
        assert np.abs(ref.numpy() - FX["embeddings"][f"{key}.emb"]).max() < 5e-4
    ref = diffusers.DDPMScheduler(1000)
    ref.alphas_cumprod = torch.tensor(ABAR)
    for t in FORWARD_T:
        c = group(FX["forward"], f"q_sample.t{t}")
        out = ref.add_noise(torch.tensor(c["x0"]), torch.tensor(c["noise"]), torch.tensor([t, t]))
        assert np.abs(out.numpy() - c["x_t"]).max() < 1e-13


# ----------------------------------------------------------------------------- diffusers through the oracle


def diffusers_adapters(float64=True):
    """DDPMScheduler and DDIMScheduler as oracle adapters: the glue an implementer writes (<= 20 lines each)."""
    torch, diffusers = pytest.importorskip("torch"), pytest.importorskip("diffusers")
    abar = torch.tensor(ABAR)  # float64=True: swap in float64 alphas_cumprod; else diffusers as shipped

    class DDPM:
        precision = "float64" if float64 else "float32"

        def ddpm_step(self, model_output, t, prev_t, sample, noise, prediction_type, variance_type, clip_sample):
            s = diffusers.DDPMScheduler(1000, variance_type=variance_type, prediction_type=prediction_type,
                                        clip_sample=clip_sample)
            if float64:
                s.alphas_cumprod, s.one = abar, torch.tensor(1.0, dtype=torch.float64)
            s.set_timesteps(timesteps=[t, prev_t] if prev_t >= 0 else [t])  # previous timestep = next entry
            with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", lambda *a, **k: torch.tensor(noise)):
                out = s.step(torch.tensor(model_output), t, torch.tensor(sample))
            return out.prev_sample, out.pred_original_sample

        def add_noise(self, x0, noise, t):
            s = diffusers.DDPMScheduler(1000)
            s.alphas_cumprod = abar if float64 else s.alphas_cumprod
            return s.add_noise(torch.tensor(x0), torch.tensor(noise), torch.tensor([t] * len(x0)))

        def timesteps(self, num_inference_steps, timestep_spacing, steps_offset):
            s = diffusers.DDPMScheduler(1000, timestep_spacing=timestep_spacing, steps_offset=steps_offset)
            s.set_timesteps(num_inference_steps)
            return s.timesteps[:num_inference_steps]

    class DDIM:
        precision = "float64" if float64 else "float32"
        conventions = {"prev_timestep": "t_minus_T_over_n"}  # DDIMScheduler.step goes to t - T // n

        def ddim_step(self, model_output, t, prev_t, sample, noise, eta, prediction_type, set_alpha_to_one, clip_sample):
            s = diffusers.DDIMScheduler(1000, prediction_type=prediction_type, clip_sample=clip_sample,
                                        set_alpha_to_one=set_alpha_to_one)
            if float64:
                s.alphas_cumprod = abar
                s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if set_alpha_to_one else abar[0]
            s.set_timesteps(1000 // (t - prev_t))  # so that t - 1000 // n is prev_t (or < 0 for prev_t = -1)
            out = s.step(torch.tensor(model_output), t, torch.tensor(sample), eta=eta, variance_noise=torch.tensor(noise),
                         use_clipped_model_output=clip_sample)
            return out.prev_sample, out.pred_original_sample

        def prev_timesteps(self, timesteps, num_train_timesteps, num_inference_steps):
            return timesteps - num_train_timesteps // num_inference_steps  # the line in DDIMScheduler.step

    return DDPM(), DDIM()


def test_diffusers_schedulers_through_the_oracle():
    ddpm, ddim = diffusers_adapters()
    r = check(ddpm)
    # diffusers' fixed_large_log step takes the sqrt of a log-variance (NaN): docs/conventions.md
    assert {x.name.split(".")[2] for x in r.failed} == {"fixed_large_log"}, r.table(failures_only=True)
    assert all("NaN" in x.message for x in r.failed)
    assert max(x.max_rel for x in r.results if x.status == "pass") < 1e-13
    r = check(ddim)
    assert r.ok and len(r.results) == 72 + 24, r.table(failures_only=True)
    assert max(x.max_rel for x in r.results if x.function == "ddim_step") < 1e-13


def test_diffusers_as_shipped_pass_at_float32_precision():
    ddpm, ddim = diffusers_adapters(float64=False)
    r = check(ddpm)
    assert {x.name.split(".")[2] for x in r.failed} <= {"fixed_large_log"}, r.table(failures_only=True)
    assert check(ddim).ok
    assert not check(ddpm, precision="float64").ok  # float32 tensors under a float64 claim: dtype failures


def test_float32_stored_buffers_pass_at_their_precision():
    """PlainDDPM with alphas_cumprod computed in float64 and stored as float32 (a register_buffer(.float()))."""
    src = (Path(__file__).parent / "oracles" / "numpy_ddpm.py").read_text()
    mod = types.ModuleType("numpy_ddpm_f32")
    exec(src.replace("np.cumprod(1.0 - betas)", "np.cumprod(1.0 - betas).astype(np.float32)"), mod.__dict__)
    r64, r32 = check(mod.PlainDDPM()), check(mod.PlainDDPM(), precision="float32_stored")
    assert not r64.ok and r32.ok, r32.table(failures_only=True)
    assert 1e-5 < max(x.max_rel for x in r32.results if x.function == "posterior") < 1e-3


def test_readme_says_what_each_array_means():
    from minidiff.fixtures import GROUPS, readme_text
    from minidiff.fixtures_readme import MEANINGS
    assert set(MEANINGS) == set(GROUPS)
    text = readme_text({"forward": FX["forward"], "timesteps": FX["timesteps"]})
    assert MEANINGS["forward"] in text and "log_variance_floor" in text and MEANINGS["timesteps"] in text
