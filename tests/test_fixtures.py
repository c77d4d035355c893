"""`minidiff fixtures`: the files load without pickle, cover every option, and hold what minidiff
computes from the stored inputs; where PyTorch/diffusers are installed, they agree with those
libraries to the tolerances docs/oracle.md gives (and for the reasons it gives)."""

import json
from unittest import mock

import numpy as np
import pytest

from minidiff import nn
from minidiff.cli import build_parser
from minidiff.fixtures import (
    EMB_DIMS,
    GROUPS,
    INFERENCE_STEPS,
    add_fixtures_parser,
    build_fixtures,
    readme_text,
    write_fixtures,
)
from minidiff.fixtures_model import BACKWARDS, NN_CASES
from minidiff.diffusion.guidance import cfg, classifier_guided_eps, rescale_noise_cfg
from minidiff.diffusion.sampler import VARIANCE_TYPES, ddim_step, ddpm_step
from minidiff.diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES, make_schedule
from minidiff.diffusion.timesteps import TIMESTEP_SPACINGS, ddim_prev_timesteps, make_timesteps
from minidiff.model.unet import unet_backward, unet_forward
from minidiff.model.config import UNetConfig


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """{file stem: {key: array}}, written to disk and read back with allow_pickle=False."""
    out = tmp_path_factory.mktemp("fixtures")
    paths = write_fixtures(out)
    assert sorted(p.name for p in paths) == sorted([f"{g}.npz" for g in GROUPS] + ["README.md"])
    loaded = {}
    for g in GROUPS:
        with np.load(out / f"{g}.npz", allow_pickle=False) as f:
            loaded[g] = {k: f[k] for k in f.files}
    loaded["_dir"] = out
    return loaded


def group(d: dict, prefix: str) -> dict:
    """The fields of one case: group(fx['nn'], 'nn.linear') -> {'x': ..., 'w': ..., ...}."""
    return {k[len(prefix) + 1:]: v for k, v in d.items() if k.startswith(prefix + ".")}


# ----------------------------------------------------------------------------- the files


def test_portable_small_and_documented(fx):
    total = sum(p.stat().st_size for p in fx["_dir"].iterdir())
    assert total < 3e6, f"fixtures grew to {total / 1e6:.1f} MB"
    readme = (fx["_dir"] / "README.md").read_text()
    for g in GROUPS:
        for key, v in fx[g].items():
            assert v.dtype.kind in "biufU", (key, v.dtype)  # no object arrays: loadable without pickle
            assert v.dtype.kind != "f" or v.dtype == np.float64, key
            case, _, field = key.rpartition(".")
            assert f"`{case or '(top level)'}`" in readme and f"`{field}` {tuple(v.shape)}" in readme, key


def test_deterministic():
    """Two builds give identical arrays (every draw comes from a seeded host generator)."""
    a, b = build_fixtures(["ddpm_step", "nn"]), build_fixtures(["ddpm_step", "nn"])
    for g in a:
        assert a[g].keys() == b[g].keys()
        for k in a[g]:
            np.testing.assert_array_equal(a[g][k], b[g][k], err_msg=k)


def test_covers_every_option(fx):
    s, t, d, e = fx["schedules"], fx["timesteps"], fx["ddpm_step"], fx["ddim_step"]
    for name in BETA_SCHEDULES:
        assert f"{name}.betas" in s and f"{name}.zero_snr.betas" in s
    for spacing in TIMESTEP_SPACINGS:
        for n in INFERENCE_STEPS:
            assert f"{spacing}.n{n}.offset1.ddim_prev_timesteps" in t
    for pred in PREDICTION_TYPES:
        assert f"ddim.{pred}.eta_1.alpha_bar0.last.prev_sample" in e
        for vt in VARIANCE_TYPES:
            for case in ("skip", "consecutive", "last", "skip_clip"):
                assert f"ddpm.{pred}.{vt}.{case}.noise" in d
    for flip in (0, 1):
        for shift in (0, 1):
            assert all(f"temb.flip{flip}.shift{shift}.dim{dim}.emb" in fx["embeddings"] for dim in EMB_DIMS)
    ops = {op.split(".")[0] for op in NN_CASES}
    exported = {name[:-len("_forward")] for name in nn.__all__ if name.endswith("_forward")}
    assert exported - ops == {"timestep_embedding"}  # in embeddings.npz
    unet = fx["unet"]
    assert {k[6:] for k in unet if k.startswith("param.")} == {k[5:] for k in unet if k.startswith("grad.")}


def test_cli_and_bad_input(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_fixtures_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["fixtures", "--out", str(tmp_path / "f"), "--only", "guidance", "timesteps"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["README.md", "guidance.npz", "timesteps.npz"]
    assert "wrote 3 files" in capsys.readouterr().out
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(ValueError, match="out_dir"):
        write_fixtures(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "keep me"
    with pytest.raises(ValueError, match="groups"):
        build_fixtures(["nope"])
    try:
        args = build_parser().parse_args(["fixtures", "--out", "x"])
    except SystemExit:  # cli.py does not register the subcommand (yet)
        return
    assert args.func.__name__ == "cmd_fixtures" and args.out == "x"


def test_readme_lists_cases():
    text = readme_text(build_fixtures(["guidance"]))
    assert "| `cfg.s_7p5` | `guidance_scale` (), `w` (), `out` (2, 2, 3, 3) |" in text


# ----------------------------------------------------------------------------- recomputed with minidiff


def test_schedules_and_timesteps_recompute(fx):
    s = fx["schedules"]
    for name in BETA_SCHEDULES:
        for zero_snr in (False, True):
            key = name + (".zero_snr" if zero_snr else "")
            sched = make_schedule(1000, name, float(s[f"{key}.beta_start"]), float(s[f"{key}.beta_end"]),
                                  rescale_betas_zero_snr=zero_snr)
            for field in ("betas", "alphas_cumprod", "posterior_variance", "posterior_mean_coef1"):
                np.testing.assert_array_equal(s[f"{key}.{field}"], getattr(sched, field))
    np.testing.assert_allclose(s["linear.betas"], np.linspace(1e-4, 0.02, 1000), rtol=1e-15)  # by hand
    np.testing.assert_allclose(s["linear.alphas_cumprod"], np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), rtol=1e-13)
    assert s["squaredcos_cap_v2.zero_snr.alphas_cumprod"][-1] == 0
    t = fx["timesteps"]
    assert t["leading.n7.offset1.timesteps"].tolist() == [853, 711, 569, 427, 285, 143, 1]  # k * (1000 // 7) + 1
    assert t["trailing.n7.offset0.prev_timesteps"].tolist() == [856, 713, 570, 428, 285, 142, -1]
    assert t["trailing.n7.offset0.timesteps"].tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert t["trailing.n7.offset0.ddim_prev_timesteps"].tolist() == [857, 714, 571, 428, 286, 143, 0]  # t - 142
    for spacing in TIMESTEP_SPACINGS:
        for n in INFERENCE_STEPS:
            ts = make_timesteps(1000, n, spacing, 1)
            np.testing.assert_array_equal(t[f"{spacing}.n{n}.offset1.timesteps"], ts)
            np.testing.assert_array_equal(t[f"{spacing}.n{n}.offset1.ddim_prev_timesteps"],
                                          ddim_prev_timesteps(ts, 1000, n))


def test_steps_recompute(fx):
    s = make_schedule()
    for pred in PREDICTION_TYPES:
        for vt in VARIANCE_TYPES:
            for case in ("skip", "last", "skip_clip"):
                c = group(fx["ddpm_step"], f"ddpm.{pred}.{vt}.{case}")
                prev, x0 = ddpm_step(s, c["model_output"], int(c["t"]), int(c["prev_t"]), c["sample"], c["noise"],
                                     vt, pred, bool(c["clip_sample"]), float(c["clip_sample_range"]))
                np.testing.assert_array_equal(prev, c["prev_sample"])
                np.testing.assert_array_equal(x0, c["pred_original_sample"])
        c = group(fx["ddim_step"], f"ddim.{pred}.eta_0p5.alpha_bar0.last")
        prev, x0 = ddim_step(s, c["model_output"], int(c["t"]), int(c["prev_t"]), c["sample"], float(c["eta"]),
                             c["noise"], bool(c["set_alpha_to_one"]), pred)
        np.testing.assert_array_equal(prev, c["prev_sample"])
    # one step by hand from the equations: DDPM eq. 7 with fixed_small (beta~), t = 500 -> 400
    c = group(fx["ddpm_step"], "ddpm.epsilon.fixed_small.skip")
    a_t, a_p = s.alphas_cumprod[500], s.alphas_cumprod[400]
    x0 = (c["sample"] - np.sqrt(1 - a_t) * c["model_output"]) / np.sqrt(a_t)
    mean = np.sqrt(a_p) * (1 - a_t / a_p) / (1 - a_t) * x0 + np.sqrt(a_t / a_p) * (1 - a_p) / (1 - a_t) * c["sample"]
    var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
    np.testing.assert_allclose(c["prev_sample"], mean + np.sqrt(var) * c["noise"], rtol=1e-12, atol=1e-12)
    # DDIM eq. 12, eta = 0, t = 20 -> before the start with final_alpha_cumprod = 1: x_prev = x0^
    c = group(fx["ddim_step"], "ddim.epsilon.eta_0.alpha_one.last")
    np.testing.assert_allclose(c["prev_sample"], c["pred_original_sample"], rtol=1e-12, atol=1e-12)


def test_guidance_and_embeddings_recompute(fx):
    g = fx["guidance"]
    for name in ("s_0", "s_1", "s_3", "s_7p5"):
        s = float(g[f"cfg.{name}.guidance_scale"])
        assert float(g[f"cfg.{name}.w"]) == s - 1
        eps_u, eps_c = g["cfg.eps_uncond"], g["cfg.eps_cond"]
        np.testing.assert_allclose(g[f"cfg.{name}.out"], eps_u + s * (eps_c - eps_u), rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(g["cfg.s_1.out"], g["cfg.eps_cond"], rtol=0, atol=1e-15)  # s = 1: conditional
    np.testing.assert_array_equal(g["cfg.s_0.out"], g["cfg.eps_uncond"])  # s = 0: unconditional
    np.testing.assert_array_equal(g["cfg.s_3.out"], cfg(g["cfg.eps_uncond"], g["cfg.eps_cond"], 3.0))
    np.testing.assert_array_equal(g["rescale.phi_0p7.out"], rescale_noise_cfg(g["rescale.noise_cfg"],
                                                                               g["rescale.noise_pred_text"], 0.7))
    c = group(g, "classifier")
    out = classifier_guided_eps(make_schedule(), c["eps"], c["x_t"], c["t"], lambda x, t, y: c["grad"],
                                float(c["classifier_scale"]))
    np.testing.assert_array_equal(out, c["out"])
    e = fx["embeddings"]
    t = e["temb.t"]
    for flip in (0, 1):
        for shift in (0, 1):
            for dim in EMB_DIMS:
                c = group(e, f"temb.flip{flip}.shift{shift}.dim{dim}")
                emb, cache = nn.timestep_embedding_forward(t, dim, bool(flip), float(shift), dtype=np.float64)
                np.testing.assert_array_equal(emb, c["emb"])
                np.testing.assert_array_equal(nn.timestep_embedding_backward(c["demb"], cache), c["dt"])
    half = 4  # dim 8 by hand: [sin, cos] with f_k = 10000^(-k / (half - 1)) at t = 10
    a = 10.0 * 10000.0 ** (-np.arange(half) / (half - 1))
    np.testing.assert_allclose(e["temb.flip0.shift1.dim8.emb"][2], np.concatenate([np.sin(a), np.cos(a)]), rtol=1e-14)


def test_nn_ops_recompute(fx):
    d = fx["nn"]
    for op, (forward, specs, options, grad_names) in NN_CASES.items():
        c = group(d, f"nn.{op}")
        y, cache = forward(**{k: c[k] for k in specs}, **{k: c[k].item() for k in options})
        np.testing.assert_array_equal(y, c["y"], err_msg=op)
        grads = BACKWARDS[forward](c["dy"], cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        for name, gr in zip(grad_names, grads):
            assert (gr is None) == (f"d{name}" not in c), (op, name)
            if gr is not None:
                np.testing.assert_array_equal(gr, c[f"d{name}"], err_msg=f"{op} d{name}")


def test_unet_recompute(fx):
    u = fx["unet"]
    config = UNetConfig.from_json(str(u["config_json"]))
    params = {k[6:]: v for k, v in u.items() if k.startswith("param.")}
    y, cache = unet_forward(params, config, u["x"], u["t"])
    np.testing.assert_array_equal(y, u["y"])
    grads, dx = unet_backward(u["dy"], cache)
    np.testing.assert_array_equal(dx, u["dx"])
    assert list(grads) == [k[5:] for k in u if k.startswith("grad.")]
    for k, v in grads.items():
        np.testing.assert_array_equal(v, u[f"grad.{k}"], err_msg=k)


# ----------------------------------------------------------------------------- against PyTorch / diffusers


def close(ours, theirs, rel=1e-10, abs_=1e-13):
    """max|a - b| <= rel * max(|a|, |b|) + abs_: relative in the max norm, with an absolute floor for
    gradients that are zero by the math and hold rounding noise on both sides (mha's dbk)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = max(np.abs(ours).max(initial=0), np.abs(theirs).max(initial=0))
    return float(np.abs(ours - theirs).max(initial=0)) <= rel * scale + abs_


def torch_op(torch, op: str, a: dict):
    """The PyTorch twin of one nn fixture, a = {name: tensor} (docs/oracle.md, "nn ops")."""
    F, name = torch.nn.functional, op.split(".")[0]
    opt = lambda k, default: int(a[k]) if k in a else default  # noqa: E731
    if name == "linear":
        return F.linear(a["x"], a["w"], a["b"])
    if name == "conv2d":
        return F.conv2d(a["x"], a["w"], a["b"], stride=opt("stride", 1), padding=opt("padding", 0))
    if name == "groupnorm":
        return F.group_norm(a["x"], int(a["num_groups"]), a["gamma"], a["beta"], eps=float(a["eps"]))
    if name == "silu":
        return F.silu(a["x"])
    if name == "groupnorm_silu":
        return F.silu(F.group_norm(a["x"], int(a["num_groups"]), a["gamma"], a["beta"], eps=float(a["eps"])))
    if name == "sdpa":
        mask = a["mask"][:, None, None, :] if "mask" in a else None
        return F.scaled_dot_product_attention(a["q"], a["k"], a["v"], attn_mask=mask)
    if name == "mha":
        ctx, h = a.get("context", a["x"]), int(a["heads"])
        split = lambda u: u.unflatten(-1, (h, -1)).transpose(1, 2)  # noqa: E731  (N, T, h*D) -> (N, h, T, D)
        q, k, v = split(F.linear(a["x"], a["wq"], a["bq"])), split(F.linear(ctx, a["wk"], a["bk"])), split(
            F.linear(ctx, a["wv"], a["bv"]))
        return F.linear(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2), a["wo"], a["bo"])
    if name == "embedding":
        return F.embedding(a["ids"], a["weight"])
    if name == "upsample_nearest2x":
        return F.interpolate(a["x"], scale_factor=2, mode="nearest")
    if name == "downsample":
        p = int(a["padding"])
        x = F.pad(a["x"], (0, 1, 0, 1)) if p == 0 else a["x"]  # diffusers' Downsample2D with padding=0
        return F.conv2d(x, a["w"], a["b"], stride=2, padding=p)
    if name == "avgpool2x2":
        return F.avg_pool2d(a["x"], 2, 2)
    if name == "dropout":  # torch draws its own mask: apply the stored one
        return a["x"] * a["mask"] / (1 - float(a["p"]))
    if name == "mse":
        return F.mse_loss(a["pred"], a["target"])
    if name == "softmax_cross_entropy":
        return F.cross_entropy(a["logits"], a["labels"])
    raise KeyError(op)


def test_nn_ops_match_torch_autograd(fx):
    torch = pytest.importorskip("torch")
    d = fx["nn"]
    for op in NN_CASES:
        c = group(d, f"nn.{op}")
        a = {k: torch.tensor(v, requires_grad=v.dtype == np.float64 and v.ndim > 0) for k, v in c.items()
             if k not in ("y", "dy") and not k.startswith("d")}
        y = torch_op(torch, op, a)
        y.backward(torch.tensor(c["dy"]))
        assert close(y.detach().numpy(), c["y"]), op
        for k in c:
            if k.startswith("d") and k != "dy":
                assert close(a[k[1:]].grad.numpy(), c[k]), f"{op} {k}"


def test_unet_matches_diffusers(fx):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    u = fx["unet"]
    kwargs = {k: v for k, v in json.loads(str(u["diffusers_config_json"])).items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs).double().eval()
    model.load_state_dict({k[6:]: torch.tensor(v) for k, v in u.items() if k.startswith("param.")}, strict=True)
    x = torch.tensor(u["x"], requires_grad=True)
    # float32 Timesteps as diffusers ships it: the angles t f_k round to float32 (~1e-4 at t = 700)
    y32 = model(x, torch.tensor(u["t"])).sample
    assert close(y32.detach().numpy(), u["y"], rel=1e-4) and not close(y32.detach().numpy(), u["y"], rel=1e-10)

    def time_proj64(t):  # diffusers' get_timestep_embedding in float64 (flip_sin_to_cos, freq_shift from config)
        half = model.config.block_out_channels[0] // 2
        f = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float64) / (half - model.config.freq_shift))
        emb = torch.cat([torch.sin(t.double()[:, None] * f), torch.cos(t.double()[:, None] * f)], dim=1)
        return torch.cat([emb[:, half:], emb[:, :half]], dim=1) if model.config.flip_sin_to_cos else emb

    model.time_proj.forward = time_proj64
    y = model(x, torch.tensor(u["t"])).sample
    y.backward(torch.tensor(u["dy"]))
    scale = max(np.abs(v).max() for k, v in u.items() if k.startswith("grad."))
    assert close(y.detach().numpy(), u["y"])
    assert close(x.grad.numpy(), u["dx"])
    for k, p in model.named_parameters():
        assert close(p.grad.numpy(), u[f"grad.{k}"], abs_=1e-12 * scale), k


def test_steps_and_timesteps_match_diffusers(fx):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    abar = torch.tensor(make_schedule().alphas_cumprod)  # diffusers keeps float32: swap in float64
    for spacing in TIMESTEP_SPACINGS:
        for n in INFERENCE_STEPS:
            for offset in (0, 1):
                ref = diffusers.DDIMScheduler(1000, timestep_spacing=spacing, steps_offset=offset)
                ref.set_timesteps(n)
                assert ref.timesteps.tolist() == fx["timesteps"][f"{spacing}.n{n}.offset{offset}.timesteps"].tolist()
    for pred in PREDICTION_TYPES:
        for vt in VARIANCE_TYPES:
            for case in ("skip", "consecutive", "last", "skip_clip"):
                c = group(fx["ddpm_step"], f"ddpm.{pred}.{vt}.{case}")
                ref = diffusers.DDPMScheduler(1000, variance_type=vt, prediction_type=pred,
                                              clip_sample=bool(c["clip_sample"]), clip_sample_range=1.0)
                ref.alphas_cumprod, ref.one = abar, torch.tensor(1.0, dtype=torch.float64)
                t, prev_t = int(c["t"]), int(c["prev_t"])
                ref.set_timesteps(timesteps=[t, prev_t] if prev_t >= 0 else [t])  # prev_t = the next entry
                with mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor",
                                lambda *a, **k: torch.tensor(c["noise"])):  # inject the stored noise
                    out = ref.step(torch.tensor(c["model_output"]), t, torch.tensor(c["sample"]))
                assert close(out.pred_original_sample.numpy(), c["pred_original_sample"]), (pred, vt, case)
                if vt != "fixed_large_log":  # diffusers takes the sqrt of a log-variance there (NaN)
                    assert close(out.prev_sample.numpy(), c["prev_sample"]), (pred, vt, case)
        for key in [k[:-len(".t")] for k in fx["ddim_step"] if k.startswith(f"ddim.{pred}.") and k.endswith(".t")]:
            c = group(fx["ddim_step"], key)
            ref = diffusers.DDIMScheduler(1000, prediction_type=pred, clip_sample=bool(c["clip_sample"]),
                                          set_alpha_to_one=bool(c["set_alpha_to_one"]))
            ref.alphas_cumprod = abar
            ref.final_alpha_cumprod = torch.tensor(1.0) if c["set_alpha_to_one"] else abar[0]
            ref.set_timesteps(10)  # DDIMScheduler steps to t - 1000 // 10: 500 -> 400, 20 -> before the start
            out = ref.step(torch.tensor(c["model_output"]), int(c["t"]), torch.tensor(c["sample"]), eta=float(c["eta"]),
                           use_clipped_model_output=bool(c["use_clipped_model_output"]),
                           variance_noise=torch.tensor(c["noise"]))
            assert close(out.prev_sample.numpy(), c["prev_sample"]), key


def test_schedules_and_embeddings_match_diffusers(fx):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.embeddings import get_timestep_embedding

    s = fx["schedules"]
    for name in BETA_SCHEDULES:
        for zero_snr in (False, True):
            key = name + (".zero_snr" if zero_snr else "")
            ref = diffusers.DDPMScheduler(1000, beta_schedule=name, beta_start=float(s[f"{key}.beta_start"]),
                                          beta_end=float(s[f"{key}.beta_end"]), rescale_betas_zero_snr=zero_snr)
            # diffusers computes in float32: the cumprod of 1000 rounded factors drifts (measured 8e-7), and
            # zero-SNR betas = 1 - abar_t / abar_{t-1} cancel in float32 (measured 7e-6)
            assert close(ref.betas.numpy(), s[f"{key}.betas"], rel=0, abs_=2e-5 if zero_snr else 1e-7), key
            assert close(ref.alphas_cumprod.numpy(), s[f"{key}.alphas_cumprod"], rel=0, abs_=2e-6), key
    e = fx["embeddings"]
    t = e["temb.t"]
    for flip in (0, 1):
        for shift in (0, 1):
            for dim in EMB_DIMS:
                ref = get_timestep_embedding(torch.tensor(t), dim, bool(flip), shift).numpy()
                # diffusers computes in float32: f_k, a = t f_k and sin/cos each round, 8 u (1 + |a|) <= 5e-4 for
                # t < 1000 (u = 2^-24; measured 9e-6)
                assert close(ref, e[f"temb.flip{flip}.shift{shift}.dim{dim}.emb"], rel=0, abs_=5e-4)


def test_karras_sampler_fixtures_recompute(fx):
    """The karras group: every sampler x Karras x n has its timesteps and sigmas (diffusers' own are checked in
    tests/diffusion/test_karras_samplers_diffusers.py); each step recomputes from its inputs."""
    from minidiff.diffusion.karras_samplers import dpmsolver_pp_2m_step, euler_ancestral_step, euler_step, heun_step
    from minidiff.diffusion.sigmas import KARRAS_SAMPLERS, make_sigmas
    from minidiff.fixtures_samplers import KARRAS_PREDICTIONS, KARRAS_STEPS

    k, s = fx["karras"], make_schedule(1000)
    for sampler in KARRAS_SAMPLERS:
        for karras in (False, True):
            for n in KARRAS_STEPS:
                c = group(k, f"{sampler}.{'karras' if karras else 'plain'}.n{n}")
                ts, sg = make_sigmas(s, n, sampler, karras)
                np.testing.assert_array_equal(c["timesteps"], ts)
                np.testing.assert_array_equal(c["sigmas"], sg)
                assert c["sigmas"].shape == (n + 1,) and c["sigmas"][-1] == 0
        for pred in KARRAS_PREDICTIONS:
            c = group(k, f"{sampler}.{pred}.step")
            a = (c["model_output"], float(c["sigma"]), float(c["sigma_next"]), c["sample"])
            if sampler == "euler":
                got = euler_step(*a, pred)
            elif sampler == "euler_a":
                got = euler_ancestral_step(*a, c["noise"], pred)
            elif sampler == "heun":
                x_mid, _, half = heun_step(*a, None, pred)
                np.testing.assert_allclose(x_mid, c["euler_sample"], rtol=1e-13)
                got = heun_step(c["model_output_2"], a[1], a[2], x_mid, half, pred)
            else:
                got = dpmsolver_pp_2m_step(*a, ((float(c["sigma_prev"]), c["x0_prev"]),), pred)
            np.testing.assert_allclose(got[0], c["prev_sample"], rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(got[1], c["pred_original_sample"], rtol=1e-13, atol=1e-13)



def test_likelihood_recompute(fx):
    """The bound's fixtures recompute from their inputs (the formulas themselves are checked against
    improved-diffusion in tests/diffusion/test_likelihood.py)."""
    from minidiff.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl
    from minidiff.diffusion.loss import hybrid_loss
    from minidiff.diffusion.vlb import VLB_VARIANCE_TYPES, prior_bpd, vb_terms_bpd

    f, s = fx["likelihood"], make_schedule(1000)
    k = group(f, "kl")
    close(normal_kl(k["mean1"], k["logvar1"], k["mean2"], k["logvar2"]), k["kl"])
    d = group(f, "decoder")
    close(discretized_gaussian_log_likelihood(d["x"], d["means"], d["log_scales"]), d["log_probs"])
    cases = {k.rsplit(".", 1)[0] for k in f if k.startswith("vb.")}
    assert {c.split(".")[1] for c in cases} == set(VLB_VARIANCE_TYPES) and len(cases) == 16
    for case in sorted(cases):
        c = group(f, case)
        res = vb_terms_bpd(s, c["model_output"], c["x0"], c["x_t"], int(c["t"]), case.split(".")[1],
                           with_grad="dvar" in c)
        close(res["output"], c["output"])
        if "dvar" in c:
            close(res["dvar"], c["dvar"])
    close(prior_bpd(s, f["prior.x0"]), f["prior.prior_bpd"])
    h = group(f, "hybrid")
    loss, dout = hybrid_loss(s, h["model_output"], h["x0"], h["noise"], h["t"], vlb_weight=float(h["vlb_weight"]))
    close(loss, h["loss"])
    close(dout, h["dmodel_output"])
