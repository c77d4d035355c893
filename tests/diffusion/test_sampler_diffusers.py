"""Cross-checks of timesteps, ddpm_step and ddim_step against diffusers' DDPMScheduler and
DDIMScheduler in float64 (skipped when torch or diffusers is missing).

diffusers keeps its schedule in float32; each test swaps in our float64 alphas_cumprod so that
both sides run the same float64 arithmetic and agree to rounding."""

import numpy as np
import pytest

from minidiff.diffusion import sampler as SM
from minidiff.diffusion import schedule as S
from minidiff.diffusion.timesteps import ddim_prev_timesteps, make_timesteps

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

T64 = torch.float64


def ddpm_ref(ours, n, spacing="leading", offset=0, **kw):
    ref = diffusers.DDPMScheduler(ours.num_train_timesteps, timestep_spacing=spacing, steps_offset=offset, **kw)
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.one = torch.tensor(1.0, dtype=T64)
    ref.set_timesteps(n)
    return ref


@pytest.mark.parametrize("n", [1, 7, 13, 50, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_match_diffusers(n, spacing, offset):
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler):
        ref = cls(1000, timestep_spacing=spacing, steps_offset=offset)
        ref.set_timesteps(n)
        if spacing == "leading" and offset == 1 and n == 1000:   # diffusers emits 1000, out of range
            assert ref.timesteps[0] == 1000
            with pytest.raises(ValueError, match="steps_offset"):
                make_timesteps(1000, n, spacing, offset)
            continue
        assert make_timesteps(1000, n, spacing, offset).tolist() == ref.timesteps.tolist()


def test_trailing_drops_diffusers_extra_minus_one():
    """np.arange(1000, 0, -1000/61) has 62 entries; diffusers' last one is -1, an invalid timestep."""
    ref = diffusers.DDPMScheduler(1000, timestep_spacing="trailing")
    ref.set_timesteps(61)
    assert len(ref.timesteps) == 62 and ref.timesteps[-1] == -1
    assert make_timesteps(1000, 61, "trailing").tolist() == ref.timesteps[:61].tolist()


DDPM_CONFIGS = [
    dict(variance_type="fixed_small", prediction_type="epsilon", n=1000),
    dict(variance_type="fixed_small", prediction_type="v_prediction", n=10, spacing="trailing"),
    dict(variance_type="fixed_small_log", prediction_type="sample", n=7, spacing="linspace"),
    dict(variance_type="fixed_large", prediction_type="epsilon", n=13, clip_sample=True, clip_sample_range=1.3),
    dict(variance_type="learned", prediction_type="epsilon", n=13, spacing="trailing"),
    dict(variance_type="learned_range", prediction_type="v_prediction", n=20, offset=1),
]


@pytest.mark.parametrize("cfg", DDPM_CONFIGS)
@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_step_matches_diffusers(cfg, beta_schedule):
    cfg = dict(cfg)
    n, spacing, offset = cfg.pop("n"), cfg.pop("spacing", "leading"), cfg.pop("offset", 0)
    cfg.setdefault("clip_sample", False)
    ours = S.make_schedule(1000, beta_schedule)
    ref = ddpm_ref(ours, n, spacing, offset, beta_schedule=beta_schedule, **cfg)
    ts = ref.timesteps.tolist()
    learned = cfg["variance_type"].startswith("learned")
    rng = np.random.default_rng(0)
    for i in sorted(set([0, 1, len(ts) // 2, len(ts) - 2, len(ts) - 1])):
        t, prev_t = ts[i], (ts[i + 1] if i + 1 < len(ts) else -1)
        x = rng.standard_normal((2, 3, 4, 4))
        out = rng.standard_normal((2, 6 if learned else 3, 4, 4))
        if cfg["variance_type"] == "learned":
            out[:, 3:] = rng.uniform(0.01, 0.5, (2, 3, 4, 4))     # a variance must be positive
        elif learned:
            out[:, 3:] = rng.uniform(-1, 1, (2, 3, 4, 4))
        noise = randn_tensor((2, 3, 4, 4), generator=torch.Generator().manual_seed(i), dtype=T64)
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), generator=torch.Generator().manual_seed(i))
        got = SM.ddpm_step(ours, out, t, prev_t, x, noise.numpy(), cfg["variance_type"], cfg["prediction_type"],
                           cfg["clip_sample"], cfg.get("clip_sample_range", 1.0))
        np.testing.assert_allclose(got[1], want.pred_original_sample.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[0], want.prev_sample.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("vt", SM.VARIANCE_TYPES)
def test_ddpm_std_matches_diffusers_get_variance(vt):
    """diffusers' _get_variance returns a variance, a std or a log-variance depending on the type;
    step() then applies sqrt, identity or exp(x / 2). For fixed_large_log its step takes the sqrt of a
    log-variance (NaN); we use exp(log(beta) / 2), GLIDE's meaning, which is what is compared here."""
    ours = S.make_schedule()
    ref = ddpm_ref(ours, 20, "trailing")
    pv = torch.full((1, 2), 0.3, dtype=T64)
    to_std = {"fixed_small": lambda v: v**0.5, "fixed_small_log": lambda v: v, "fixed_large": lambda v: v**0.5,
              "fixed_large_log": lambda v: torch.exp(0.5 * v), "learned": lambda v: v**0.5,
              "learned_range": lambda v: torch.exp(0.5 * v)}[vt]
    ts = ref.timesteps.tolist()
    for t, p in zip(ts, ts[1:] + [-1]):
        want = to_std(ref._get_variance(t, predicted_variance=pv, variance_type=vt))
        got = SM.ddpm_std(ours, t, p, vt, predicted_variance=pv.numpy(), like=np.zeros((1, 2)))
        np.testing.assert_allclose(np.broadcast_to(got, (1, 2)), np.broadcast_to(want.numpy(), (1, 2)), rtol=1e-12)


DDIM_CONFIGS = [
    dict(eta=0.0, prediction_type="epsilon", n=50),
    dict(eta=1.0, prediction_type="epsilon", n=50, set_alpha_to_one=False),
    dict(eta=0.5, prediction_type="v_prediction", n=7, spacing="trailing"),
    dict(eta=0.3, prediction_type="sample", n=13, spacing="linspace", offset=1),
    dict(eta=0.0, prediction_type="epsilon", n=20, clip_sample=True, use_clipped_model_output=True, offset=1),
]


@pytest.mark.parametrize("cfg", DDIM_CONFIGS)
def test_ddim_step_matches_diffusers(cfg):
    cfg = dict(cfg)
    n, spacing, offset, eta = cfg.pop("n"), cfg.pop("spacing", "leading"), cfg.pop("offset", 0), cfg.pop("eta")
    use_clipped = cfg.pop("use_clipped_model_output", False)
    cfg.setdefault("clip_sample", False)
    cfg.setdefault("set_alpha_to_one", True)
    ours = S.make_schedule(1000, "scaled_linear", 8.5e-4, 0.012)
    ref = diffusers.DDIMScheduler(1000, beta_schedule="scaled_linear", beta_start=8.5e-4, beta_end=0.012,
                                  timestep_spacing=spacing,
                                  steps_offset=offset, **cfg)
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.final_alpha_cumprod = torch.tensor(1.0 if cfg["set_alpha_to_one"] else ours.alphas_cumprod[0], dtype=T64)
    ref.set_timesteps(n)
    ts = ref.timesteps.numpy()
    prevs = ddim_prev_timesteps(ts, 1000, n)                       # DDIMScheduler's own rule
    rng = np.random.default_rng(1)
    for t, p in zip(ts.tolist(), prevs.tolist()):
        x, out, z = (rng.standard_normal((2, 3, 4)) for _ in range(3))
        want = ref.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=eta, use_clipped_model_output=use_clipped,
                        variance_noise=torch.from_numpy(z))
        got = SM.ddim_step(ours, out, t, p, x, eta, z, cfg["set_alpha_to_one"], cfg["prediction_type"],
                           cfg["clip_sample"], 1.0, use_clipped)
        np.testing.assert_allclose(got[1], want.pred_original_sample.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[0], want.prev_sample.numpy(), rtol=1e-10, atol=1e-12)


def test_ddim_loop_with_ddim_prev_rule_matches_diffusers_loop():
    """sample() with prev_timesteps = t - T // n reproduces a whole DDIMScheduler loop ('trailing',
    where the 'next entry' rule would differ)."""
    ours = S.make_schedule()
    ref = diffusers.DDIMScheduler(1000, timestep_spacing="trailing", clip_sample=False)
    ref.alphas_cumprod = torch.from_numpy(ours.alphas_cumprod.copy())
    ref.final_alpha_cumprod = torch.tensor(1.0, dtype=T64)
    ref.set_timesteps(7)

    def model_fn(x, t, cond):
        return np.sin(x) * 0.5 + 1e-3 * t.reshape(-1, 1, 1)

    rng = np.random.default_rng(2)
    x_T, noises = rng.standard_normal((3, 2, 5)), rng.standard_normal((7, 3, 2, 5))
    ts = ref.timesteps.numpy()
    got = SM.sample(model_fn, (3, 2, 5), ours, "ddim", 7, "trailing", eta=0.8, x_T=x_T, noises=noises,
                    prev_timesteps=ddim_prev_timesteps(ts, 1000, 7))
    x = torch.from_numpy(x_T)
    for i, t in enumerate(ts.tolist()):
        out = torch.from_numpy(model_fn(x.numpy(), np.full(3, t), None))
        x = ref.step(out, t, x, eta=0.8, variance_noise=torch.from_numpy(noises[i])).prev_sample
    np.testing.assert_allclose(got, x.numpy(), rtol=1e-10, atol=1e-12)
    default = SM.sample(model_fn, (3, 2, 5), ours, "ddim", 7, "trailing", eta=0.8, x_T=x_T, noises=noises)
    assert not np.allclose(default, got)  # the two prev rules are different samplers here
