"""minidiff.oracle: the harness against a plain NumPy DDPM (tests/oracles/numpy_ddpm.py), the classic bugs
planted into it one at a time, bad adapter output, the CLI, and diffusers' UNet2DModel as a U-Net adapter
(tests/oracles/torch_unet.py, where torch and diffusers are installed) with bugs planted into it."""

import types
from pathlib import Path

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.oracle import check, load_adapter
from oracles.numpy_ddpm import PlainDDPM

SOURCE = (Path(__file__).parent / "oracles" / "numpy_ddpm.py").read_text()


def planted(old, new):
    """PlainDDPM with one line of its source replaced (the bug), as a fresh module."""
    assert old in SOURCE, old
    mod = types.ModuleType("numpy_ddpm_bug")
    exec(compile(SOURCE.replace(old, new), "numpy_ddpm_bug.py", "exec"), mod.__dict__)
    return mod.PlainDDPM()


def test_plain_numpy_ddpm_passes_every_case_it_implements():
    r = check(PlainDDPM())
    assert r.ok, r.table(failures_only=True)
    assert len([x for x in r.results if x.status == "pass"]) >= 90
    assert r.missing == ["unet_forward", "unet_backward"]
    trailing = r["prev_timesteps.trailing.n7.offset0"]  # DDIMScheduler's rule, declared by PlainDDPM
    assert trailing.status == "pass" and trailing.convention == "prev_timestep='t_minus_T_over_n'"
    assert r["ddpm.epsilon.fixed_small.t1"].max_rel < 1e-13 and r["ddpm.epsilon.fixed_small.t1"].status == "pass"
    assert r["ddpm.v_prediction.fixed_small.t1"].status == "skip"


def test_a_convention_must_be_declared():
    """The same output fails when the convention is not declared: a guess never makes a pass."""
    r = check(PlainDDPM(), conventions={})
    bad = r["prev_timesteps.trailing.n7.offset0"]
    assert bad.status == "fail" and bad.convention == "prev_timestep='t_minus_T_over_n'"
    assert "declare adapter.conventions['prev_timestep'] = 't_minus_T_over_n'" in bad.message
    assert r["prev_timesteps.leading.n7.offset0"].status == "pass"  # the two rules agree for 'leading'
    with pytest.raises(ValueError, match="unknown convention"):
        check(PlainDDPM(), conventions={"prev_timestep": "guess"})
    floor = planted("np.log(np.append(var[1], var[1:]))", "np.log(np.maximum(var, 1e-20))")
    r = check(floor)
    assert r["schedule.linear"].status == "fail" and r["schedule.linear"].convention == "posterior_log_variance_t0" \
        "='floor_1e-20'"
    floor.conventions = {**floor.conventions, "posterior_log_variance_t0": "floor_1e-20"}
    assert check(floor).ok


# bug: (line in numpy_ddpm.py, the planted line, a case that must fail, the functions that fail, convention named)
BUGS = {
    "alpha_index_off_by_one": ("a, a_prev = abar(t), abar(prev_t)", "a, a_prev = abar(t - 1), abar(prev_t - 1)",
                               "ddpm.epsilon.fixed_small.skip", {"ddpm_step"}, ""),
    "sqrt_missing_on_variance": ("mean + np.sqrt(var) * noise", "mean + var * noise",
                                 "ddpm.epsilon.fixed_small.t1", {"ddpm_step"}, ""),
    "clip_to_0_1": ("np.clip(x0, -1, 1)", "np.clip(x0, 0, 1)", "ddpm.epsilon.fixed_small.skip_clip",
                    {"ddpm_step", "ddim_step"}, ""),
    "noise_added_at_t0": ("if t > 0:", "if t >= 0:", "ddpm.epsilon.fixed_large.last", {"ddpm_step"}, ""),
    "noise_skipped_at_t1": ("if t > 0:", "if t > 1:", "ddpm.epsilon.fixed_small.t1", {"ddpm_step"}, ""),
    "sin_cos_swapped": ("[np.sin(a), np.cos(a)]", "[np.cos(a), np.sin(a)]", "temb.flip0.shift1.dim8",
                        {"timestep_embedding"}, "flip_sin_to_cos=True"),
    "s_used_for_w": ("w = guidance_scale - 1", "w = guidance_scale", "cfg.s_7p5", {"cfg"}, "guidance_scale='w'"),
    "ddim_sigma_dropped": ("np.sqrt(1 - a_prev - sigma**2)", "np.sqrt(1 - a_prev)",
                           "ddim.epsilon.eta_1.alpha_one.skip", {"ddim_step"}, ""),
}


@pytest.mark.parametrize("bug", list(BUGS))
def test_every_planted_bug_is_caught(bug):
    old, new, case, functions, convention = BUGS[bug]
    with np.errstate(divide="ignore", invalid="ignore"):  # alpha_index_off_by_one divides by 0: its NaNs must be caught
        r = check(planted(old, new))
    assert not r.ok
    assert r[case].status == "fail", r[case]
    assert {x.function for x in r.failed} == functions, r.table(failures_only=True)
    assert r[case].convention == convention  # named only where the output IS another convention's
    if bug == "ddim_sigma_dropped":  # eta = 0 has no sigma: those cases still pass
        assert r["ddim.epsilon.eta_0.alpha_one.skip"].status == "pass"


class BadAdapter:
    def add_noise(self, x0, noise, t):
        if t == 0:
            raise RuntimeError("boom\nsecond line")
        if t == 1:
            return x0[:1]
        if t == 10:
            return np.full(x0.shape, np.nan)
        if t == 500:
            return x0.astype(np.float32)
        return (x0 > 0)  # bool

    def cfg(self, eps_uncond, eps_cond, guidance_scale):
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def test_bad_adapter_output_fails_one_case_each_and_the_rest_run():
    r = check(BadAdapter())
    msgs = {x.name: x.message for x in r.results}
    assert msgs["add_noise.t0"] == "raised RuntimeError: boom"
    assert "shape (1, 2, 3, 3), expected (2, 2, 3, 3)" in msgs["add_noise.t1"]
    assert "NaN" in msgs["add_noise.t10"]
    assert "dtype float32 with precision 'float64'" in msgs["add_noise.t500"]
    assert "dtype bool" in msgs["add_noise.t999"]
    assert all(r[f"cfg.s_{s}"].status == "pass" for s in ("0", "1", "3", "7p5"))
    assert check(BadAdapter(), precision="float32")["add_noise.t500"].message == "differs"  # float32 accepted
    with pytest.raises(ValueError, match="precision"):
        check(BadAdapter(), precision="float16")


BUGGY = planted("w = guidance_scale - 1", "w = guidance_scale")


def test_cli_prints_the_table_and_exits_nonzero_on_a_failure(capsys):
    assert main(["oracle", "--adapter", "oracles.numpy_ddpm:PlainDDPM"]) == 0
    out = capsys.readouterr().out
    assert "ddpm.epsilon.fixed_small.t1" in out and "0 failed" in out
    assert main(["oracle", "--adapter", "test_oracle:BUGGY", "--failures-only"]) == 1
    out = capsys.readouterr().out
    assert "cfg.s_3" in out and "guidance_scale='w'" in out and "ddpm" not in out
    with pytest.raises(ValueError, match="module:object"):
        load_adapter("oracles.numpy_ddpm")


class MinidiffUNet:
    """The unet cases' plumbing, with minidiff's own U-Net as the 'implementation' (PyTorch: TorchUNet below)."""

    def unet_forward(self, params, x, t):
        from minidiff import get_preset, unet_apply
        return unet_apply(params, get_preset("tiny"), x, t)

    def unet_backward(self, params, x, t, dy):
        from minidiff import get_preset, unet_backward, unet_forward
        grads, dx = unet_backward(dy, unet_forward(params, get_preset("tiny"), x, t)[1])
        return {"x": dx, **grads}


def test_unet_cases_run_and_name_a_wrong_gradient():
    r = check(MinidiffUNet())
    assert r.ok and [x.name for x in r.results] == ["unet.forward", "unet.backward"], r.table()
    bad = MinidiffUNet()
    bad.unet_backward = lambda params, x, t, dy: {**MinidiffUNet().unet_backward(params, x, t, dy), "x": 0 * x}
    assert check(bad)["unet.backward"].status == "fail"


def torch_unet(change=None):
    """tests/oracles/torch_unet.py's TorchUNet, with `change(model, adapter)` applied after the weights load."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from oracles.torch_unet import TorchUNet

    class Planted(TorchUNet):
        def model(self, params):
            model = super().model(params)
            change(model, self)
            return model

    return Planted() if change else TorchUNet()


def test_diffusers_unet2dmodel_passes_every_unet_case_at_float64():
    r = check(torch_unet())
    assert r.ok, r.table(failures_only=True)
    fwd, bwd = r["unet.forward"], r["unet.backward"]
    assert fwd.status == bwd.status == "pass" and fwd.max_rel < 1e-13  # measured 9e-16
    assert bwd.max_abs < 1e-13  # 2.5e-14 on gradients up to 19 (max_rel counts to_k.bias: zero by the math)
    assert all(x.status == "pass" for x in r.results if x.function == "timestep_embedding")


def set_groupnorm_eps(model, adapter):  # every GroupNorm at eps 1e-6 instead of the config's 1e-5
    import torch
    for m in model.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-6


def sin_cos_order(model, adapter):  # [sin, cos] (Ho et al.'s order) where the config says flip_sin_to_cos
    model.time_proj.forward = lambda t: adapter.timestep_embedding(t, 8, False, 0)


@pytest.mark.parametrize("bug", [set_groupnorm_eps, sin_cos_order])
def test_bugs_planted_into_unet2dmodel_are_caught(bug):
    r = check(torch_unet(bug))
    assert r["unet.forward"].status == r["unet.backward"].status == "fail", r.table()
    assert r["unet.forward"].message == "differs" and r["unet.forward"].max_rel > 1e-6


def test_diffusers_float32_timesteps_pass_only_at_float32_precision():
    def shipped(model, adapter):  # diffusers' own Timesteps: the sinusoid in float32
        from diffusers.models.embeddings import Timesteps
        model.time_proj = Timesteps(8, flip_sin_to_cos=True, downscale_freq_shift=0)

    assert not check(torch_unet(shipped)).ok
    r = check(torch_unet(shipped), precision="float32")
    assert r["unet.forward"].status == r["unet.backward"].status == "pass", r.table()


def test_the_console_script_finds_an_adapter_in_the_current_folder(tmp_path):
    """`minidiff oracle --adapter adapter:X` run from the adapter's folder (a console script, whose sys.path
    lacks the current folder; python -P runs the same way) imports ./adapter.py as `python -m` would."""
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "my_adapter.py").write_text("class Nothing:\n    pass\n")
    root = Path(__file__).resolve().parents[1]
    code = "import sys; from minidiff.cli import main; sys.exit(main(['oracle', '--adapter', 'my_adapter:Nothing']))"
    r = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert "ModuleNotFoundError" not in r.stderr + r.stdout, r.stderr
    assert "not provided by the adapter" in r.stdout and r.returncode == 0, (r.returncode, r.stdout, r.stderr)
