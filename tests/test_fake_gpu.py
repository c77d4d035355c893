"""The GPU code paths, run on the CPU with fake_cupy (NumPy standing in for CuPy; see its docstring).

Each test compares the "device" run with the plain NumPy run in float64, where the two take
different code (the strided im2col instead of per-tap copies and Winograd, the fused SiLU kernels,
the whole batch in one conv GEMM, the flat buffers in one piece, the masks drawn on the device),
and watches what the steps read back to the host. These are no substitute for tests/test_gpu_parity.py
on a real GPU: they cannot see CuPy's own behaviour, only minidiff's logic on its GPU branches.
"""

import dataclasses
import sys

import numpy as np
import pytest

import fake_cupy
from gradcheck import grads_rel_error, rel_error
from minidiff import flat
from minidiff.backend import is_cupy_array, to_device, to_numpy
from minidiff.bench import run_bench
from minidiff.config import TrainConfig
from minidiff.loss import diffusion_loss
from minidiff.nn.dropout import dropout_mask
from minidiff.optim import AdamW, clip_grad_norm
from minidiff.sampler import sample
from minidiff.schedule import add_noise, make_schedule
from minidiff.train import Trainer
from minidiff.unet import init_params, unet_backward, unet_forward
from minidiff.unet_config import get_preset

TOL = 1e-10  # float64, two code paths: rounding only


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def training_step(device, config, one_buffer):
    schedule = make_schedule(1000, "linear")
    params = to_device(init_params(config, seed=0, dtype=np.float64), device)
    params = flat.flatten(params) if one_buffer else params
    opt = AdamW(params, lr=1e-3)
    x0, noise = randn(3, 3, 8, 8, seed=1), randn(3, 3, 8, 8, seed=2)
    t = np.array([5, 500, 999])
    x0, noise = to_device(x0, device), to_device(noise, device)
    x_t = add_noise(schedule, x0, noise, t)
    eps, cache = unet_forward(params, config, x_t, t, train=True, rng=np.random.default_rng(7))
    loss, deps = diffusion_loss(schedule, eps, x0, noise, t)
    grads, dx = unet_backward(deps, cache)
    grads = flat.gather(grads, like=params)
    norm = clip_grad_norm(grads, 0.05)
    opt.step(params, grads)
    return loss, norm, grads, dx, params


@pytest.mark.parametrize("one_buffer", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "small"])  # small: >= 32 channels, Winograd on the CPU side
def test_a_training_step_on_the_gpu_path_matches_numpy(fake, preset, one_buffer):
    config = dataclasses.replace(get_preset(preset), sample_size=8, dropout=0.1)
    loss_c, norm_c, grads_c, dx_c, params_c = training_step("cpu", config, one_buffer)
    loss_g, norm_g, grads_g, dx_g, params_g = training_step("gpu", config, one_buffer)
    assert is_cupy_array(loss_g) and is_cupy_array(dx_g)
    assert "minidiff_silu_forward" in fake.kernels_called and "minidiff_silu_backward" in fake.kernels_called
    assert abs(float(loss_g) - float(loss_c)) <= TOL * abs(float(loss_c))
    assert abs(float(norm_g) - float(norm_c)) <= TOL * float(norm_c) and float(norm_c) > 0.05
    if one_buffer:
        assert flat.buffers(params_g, grads_g) is not None and is_cupy_array(params_g.buffer)
    grad_errors = grads_rel_error(grads_g, grads_c)  # zero-in-exact-arithmetic gradients: see its floor
    for key in grads_c:
        assert is_cupy_array(grads_g[key]), key
        assert grad_errors[key] < TOL, (key, grad_errors[key])
        assert rel_error(to_numpy(params_g[key]), params_c[key]) < TOL, key
    assert rel_error(to_numpy(dx_g), dx_c) < TOL


def test_dropout_masks_are_drawn_on_the_device(fake):
    got = dropout_mask(12345, (4, 3, 5, 5), 0.2, rows=(1, 3), xp=fake)
    assert is_cupy_array(got)
    np.testing.assert_array_equal(to_numpy(got), dropout_mask(12345, (4, 3, 5, 5), 0.2, rows=(1, 3)))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_the_sampling_loop_on_the_gpu_path_matches_numpy(fake, sampler, eta):
    config = get_preset("tiny")
    schedule = make_schedule(1000, "linear")
    host = init_params(config, seed=1, dtype=np.float64)
    out = {}
    for device in ("cpu", "gpu"):
        params = to_device(host, device)
        model_fn = lambda x, t, cond: unet_forward(params, config, x, t)[0]  # noqa: E731
        steps = dict(timesteps=np.array([999, 600, 300, 0])) if sampler == "ddpm" else dict(num_inference_steps=4)
        out[device] = sample(model_fn, (2, 3, 8, 8), schedule, sampler=sampler, eta=eta, seed=3, device=device,
                             dtype=np.float64, **steps)
    assert is_cupy_array(out["gpu"])
    assert rel_error(to_numpy(out["gpu"]), out["cpu"]) < TOL


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_trainer_steps_on_the_gpu_path_read_nothing_back(fake, tmp_path, monkeypatch, conditioning):
    """Between two loss reads nothing goes device -> host (on a GPU each such copy waits for the GPU),
    and the run takes the same steps as on the CPU (float64: the same losses to rounding)."""
    losses = {}
    for device in ("cpu", "gpu"):
        cfg = TrainConfig(out=str(tmp_path / device), preset="tiny", device=device, dtype="float64", steps=4,
                          batch_size=4, conditioning=conditioning, dropout=0.1, log_every=10, save_every=100,
                          sample_every=0, threads=1)
        trainer = Trainer(cfg, log=lambda *a, **k: None)
        read_back = []
        if device == "gpu":
            assert trainer.flush_every == 10 and is_cupy_array(trainer.params.buffer)
            for name, module in list(sys.modules.items()):
                if name.startswith("minidiff") and hasattr(module, "to_numpy"):
                    def watched(x, _original=module.to_numpy, _name=name):
                        if is_cupy_array(x):
                            read_back.append((_name, x.shape))
                        return _original(x)
                    monkeypatch.setattr(module, "to_numpy", watched)
        for _ in range(3):
            trainer.train_step()
        assert read_back == []
        assert len(trainer.pending) == 3  # read by flush_losses, not by the steps
        trainer.flush_losses()
        losses[device] = trainer.losses
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=1e-12)


def test_the_bench_runs_on_the_gpu_path(fake):
    rows = run_bench("tiny", batch=2, device="gpu", repeats=1, warmup=0, use_torch=False, log=lambda *a: None)
    assert [r["what"] for r in rows][:2] == ["train step (ms)", "sample step (ms)"]
    assert all(r["device"] == "gpu" and r["minidiff"] > 0 for r in rows[:2])
