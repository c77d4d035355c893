"""Whole-run checks of the "gpu" device against the CPU, shared by tests/test_gpu_parity.py (CuPy on
a real GPU) and tests/test_fake_gpu.py (fake_cupy: NumPy standing in for CuPy).

Every check runs the same float64 computation with device="cpu" and device="gpu" from the same host
draws and asserts that they agree to tol: the two differ only in summation order (and, on the
GPU side, in the code minidiff picks for it), so any logic or layout bug gives an O(1) error.
"""

from __future__ import annotations

import sys

import numpy as np

from gradcheck import grads_rel_error, rel_error
from minidiff.fast import flat
from minidiff.backend import is_cupy_array, to_device, to_numpy
from minidiff.bench import MinidiffSide, make_inputs
from minidiff.training.config import TrainConfig
from minidiff.diffusion.loss import diffusion_loss
from minidiff.training.optim import EMA, Adam, AdamW
from minidiff.diffusion import sampler as reference_sampler
from minidiff.diffusion.sampler import sample
from minidiff.fast import sampler as fast_sampler
from minidiff.fast.ops import FAST
from minidiff.nn.ops import REFERENCE
from minidiff.diffusion.schedule import add_noise, make_schedule
from minidiff.training.trainer import Trainer
from minidiff.model.unet import init_params, unet_backward, unet_forward
from minidiff.model.config import get_preset


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def training_step(device, config, one_buffer=False, ops=REFERENCE):
    """One step of DDPM training (dropout drawn from a host seed) on one backend; one_buffer: params,
    grads and AdamW state in one flat buffer each, as the Trainer has them with FAST; ops: the table of
    the U-Net and of AdamW."""
    schedule = make_schedule(1000, "linear")
    params = to_device(init_params(config, seed=0, dtype=np.float64), device)
    params = flat.flatten(params) if one_buffer else params
    opt = AdamW(params, lr=1e-3, ops=ops)
    x0, noise = randn(3, 3, 8, 8, seed=1), randn(3, 3, 8, 8, seed=2)
    t = np.array([5, 500, 999])  # on the host, as the Trainer keeps it
    x0, noise = to_device(x0, device), to_device(noise, device)
    x_t = add_noise(schedule, x0, noise, t)
    eps, cache = unet_forward(params, config, x_t, t, train=True, rng=np.random.default_rng(7), ops=ops)
    loss, deps = diffusion_loss(schedule, eps, x0, noise, t)
    grads, dx = unet_backward(deps, cache)
    grads = flat.gather(grads, like=params)  # unchanged unless params is flat
    norm = ops.clip_grad_norm(grads, 0.05)  # small max_norm: the clipping branch runs
    opt.step(params, grads)
    return loss, norm, grads, dx, params


OPTIMIZERS = {  # name -> make(params, ops): the update variants of training/optim.py
    "adam": lambda p, ops: Adam(p, lr=1e-2, ops=ops),
    "adam_l2": lambda p, ops: Adam(p, lr=1e-2, weight_decay=0.1, ops=ops),  # the L2 term in the gradient
    "adamw": lambda p, ops: AdamW(p, lr=1e-2, weight_decay=0.1, ops=ops),  # decoupled decay
    "adam_eps0": lambda p, ops: Adam(p, lr=1e-2, eps=0.0, ops=ops),  # per tensor even on flat buffers
}


def check_optimizer_bit_for_bit(make, dtype, ops=FAST):
    """Four steps of the optimizer and the EMA with `ops` on device flat buffers (FAST: one kernel per update,
    fast/optim.py; REFERENCE: the array ops per tensor) give the reference's NumPy per-tensor numbers bit for
    bit: params, both moments, the EMA."""
    rng = np.random.default_rng(0)
    host = {f"p{i}.weight": rng.standard_normal(s).astype(dtype)
            for i, s in enumerate([(4, 3, 3, 3), (4,), (7, 5), (1,), (65,)])}
    dev = flat.flatten(to_device(host, "gpu"))
    opt_h, opt_d = make(host, REFERENCE), make(dev, ops)
    ema_h, ema_d = EMA(host, 0.99), EMA(dev, 0.99, ops=ops)
    for step in range(4):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in host.items()}
        opt_h.step(host, grads, lr=1e-2 * (step + 1))
        opt_d.step(dev, to_device(grads, "gpu"), lr=1e-2 * (step + 1))
        ema_h.update(host)
        ema_d.update(dev)
    for name, got, want in (("params", dev, host), ("exp_avg", opt_d.exp_avg, opt_h.exp_avg),
                            ("exp_avg_sq", opt_d.exp_avg_sq, opt_h.exp_avg_sq), ("ema", ema_d.shadow, ema_h.shadow)):
        for k in host:
            assert is_cupy_array(got[k]) and got[k].dtype == dtype
            diff = np.abs(to_numpy(got[k]).astype(np.float64) - want[k]).max()
            assert np.array_equal(to_numpy(got[k]), want[k]), f"{name}[{k}] differs by up to {diff:.3g}"


REVERSE_STEPS = [  # (sampler, t, prev_t, keyword arguments): the branches of the one-kernel step (fast/sampler.py)
    ("ddpm", 500, 480, {}),  # the default: epsilon, fixed_small
    ("ddpm", 999, 0, dict(variance_type="fixed_large", prediction_type="v_prediction")),
    ("ddpm", 300, 299, dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True)),
    ("ddpm", 0, -1, dict(clip_sample=True, clip_sample_range=0.5)),  # t = 0: no noise
    ("ddim", 500, 480, {}),  # eta = 0
    ("ddim", 980, 960, dict(eta=1.0, prediction_type="v_prediction", clip_sample=True)),
    ("ddim", 20, -1, dict(eta=0.5, clip_sample=True, use_clipped_model_output=True, set_alpha_to_one=False)),
    ("ddim", 700, 600, dict(prediction_type="sample", use_clipped_model_output=True)),
]


def check_reverse_step_bit_for_bit(monkeypatch, dtype):
    """One DDPM or DDIM step of fast/sampler.py on the device, one kernel with one timestep for the batch
    (fast/cuda/sampler.py, compiled with --fmad=false), gives the reference step's NumPy numbers bit for bit:
    x_prev and x0^, float32 and float64, every prediction type, clipping, use_clipped_model_output, with
    and without noise."""
    calls, kernel = [], fast_sampler.reverse_step_cuda
    monkeypatch.setattr(fast_sampler, "reverse_step_cuda", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    schedule = make_schedule(1000, "linear")
    for i, (name, t, prev_t, kwargs) in enumerate(REVERSE_STEPS):
        out, x, z = (1.5 * randn(3, 2, 5, 4, seed=10 * i + j).astype(dtype) for j in range(3))
        want = getattr(reference_sampler, f"{name}_step")(schedule, out, t, prev_t, x, noise=z, **kwargs)
        out_d, x_d, z_d = (to_device(a, "gpu") for a in (out, x, z))
        got = getattr(fast_sampler, f"{name}_step")(schedule, out_d, t, prev_t, x_d, noise=z_d, **kwargs)
        assert len(calls) == i + 1, f"{name} {kwargs}: the step did not run as one kernel"
        for what, g, w in zip(("prev_sample", "pred_original_sample"), got, want):
            assert is_cupy_array(g) and g.dtype == dtype and g.shape == w.shape
            diff = np.abs(to_numpy(g).astype(np.float64) - w).max()
            assert np.array_equal(to_numpy(g), w), f"{name} {kwargs}: {what} differs by up to {diff:.3g}"


def check_training_step(config, one_buffer, tol, ops=REFERENCE):
    """The loss, gradient norm, every gradient, dL/dx and the parameters after AdamW agree, and (on the fake
    CuPy) the step reads no device value on the host."""
    loss_c, norm_c, grads_c, dx_c, params_c = training_step("cpu", config, one_buffer, ops)
    implicit = _implicit_reads()
    loss_g, norm_g, grads_g, dx_g, params_g = training_step("gpu", config, one_buffer, ops)
    assert implicit == [], f"float()/bool()/item() of device arrays in a training step: {implicit}"
    assert is_cupy_array(loss_g) and is_cupy_array(dx_g)
    if one_buffer:
        assert flat.buffers(params_g, grads_g) is not None and is_cupy_array(params_g.buffer)
    assert abs(float(loss_g) - float(loss_c)) <= tol * abs(float(loss_c))
    assert abs(float(norm_g) - float(norm_c)) <= tol * float(norm_c) and float(norm_c) > 0.05
    assert list(grads_g) == list(grads_c) and list(params_g) == list(params_c)
    grad_errors = grads_rel_error(grads_g, grads_c)  # zero-in-exact-arithmetic gradients: see its floor
    for key in grads_c:
        assert is_cupy_array(grads_g[key]), key
        assert grad_errors[key] < tol, (key, grad_errors[key])
        assert rel_error(to_numpy(params_g[key]), params_c[key]) < tol, key
    assert rel_error(to_numpy(dx_g), dx_c) < tol


def _implicit_reads() -> list:
    """The fake CuPy's record of float(a), bool(a), a.item(), ... of device arrays, emptied now (nothing
    records into it on a real GPU, where such reads cannot be watched; a fresh list without the fake)."""
    reads = getattr(sys.modules.get("fake_cupy"), "IMPLICIT_READS", [])
    reads.clear()
    return reads


def check_sampling_loop(sampler, eta, tol):
    """The whole sampling loop (host noise, device model, FAST's steps: one kernel each on the device) gives
    the CPU's samples (the reference steps)."""
    config = get_preset("tiny")
    schedule = make_schedule(1000, "linear")
    host = init_params(config, seed=1, dtype=np.float64)
    out = {}
    for device in ("cpu", "gpu"):
        params = to_device(host, device)
        model_fn = lambda x, t, cond: unet_forward(params, config, x, t)[0]  # noqa: E731
        steps = dict(timesteps=np.array([999, 600, 300, 0])) if sampler == "ddpm" else dict(num_inference_steps=4)
        implicit = _implicit_reads()
        out[device] = sample(model_fn, (2, 3, 8, 8), schedule, sampler=sampler, eta=eta, seed=3, device=device,
                             dtype=np.float64, ops=FAST if device == "gpu" else None, **steps)
        assert implicit == [], f"float()/bool()/item() of device arrays while sampling: {implicit}"
    assert is_cupy_array(out["gpu"])
    assert rel_error(to_numpy(out["gpu"]), out["cpu"]) < tol


def watch_to_numpy(monkeypatch) -> list:
    """Record (module, shape) of each device array that any minidiff module's to_numpy copies to the host
    from now on (on a GPU each such copy waits for the GPU); returns the list it appends to."""
    read_back = []
    for name, module in list(sys.modules.items()):
        if name.startswith("minidiff") and hasattr(module, "to_numpy"):
            def watched(x, _original=module.to_numpy, _name=name):
                if is_cupy_array(x):
                    read_back.append((_name, x.shape))
                return _original(x)
            monkeypatch.setattr(module, "to_numpy", watched)
    return read_back


def check_bench_steps_read_nothing_back(monkeypatch):
    """minidiff bench's two steps on the GPU copy nothing back, as Trainer's and sample()'s steps (t stays
    on the host: a device t was read back by the timestep checks, two waits per timed training step)."""
    config = get_preset("tiny")
    schedule = make_schedule(1000, "linear")
    inputs = make_inputs(config, 2, 8, np.dtype(np.float32), 0, schedule)
    side = MinidiffSide(config, init_params(config, seed=0), inputs, "gpu", schedule)
    side.train_step(), side.sample_step()  # kernels made, caches filled
    read_back, implicit = watch_to_numpy(monkeypatch), _implicit_reads()
    side.train_step(), side.sample_step()
    assert read_back == [] and implicit == [], (read_back, implicit)


def check_trainer_steps_read_nothing_back(tmp_path, monkeypatch, conditioning, tol):
    """Between two loss reads the Trainer's steps copy nothing from the device to the host (on a GPU
    each such copy waits for the GPU: every to_numpy of minidiff is watched), and the run takes the
    same steps as on the CPU (float64, dropout on: the same losses to tol)."""
    losses = {}
    for device in ("cpu", "gpu"):
        cfg = TrainConfig(out=str(tmp_path / device), preset="tiny", device=device, dtype="float64", steps=4,
                          batch_size=4, conditioning=conditioning, dropout=0.1, log_every=10, save_every=100,
                          sample_every=0, threads=1)
        trainer = Trainer(cfg, log=lambda *a, **k: None, ops=FAST)  # the fast table, as `minidiff train`
        read_back = []
        if device == "gpu":
            assert trainer.flush_every == 10 and is_cupy_array(trainer.params.buffer)
            read_back = watch_to_numpy(monkeypatch)
        implicit = _implicit_reads()
        for _ in range(3):
            trainer.train_step()
        assert read_back == []
        assert implicit == [], f"float()/bool()/item() of device arrays in a step: {implicit}"
        assert len(trainer.pending) == 3  # read by flush_losses, not by the steps
        trainer.flush_losses()
        losses[device] = trainer.losses
    np.testing.assert_allclose(losses["gpu"], losses["cpu"], rtol=tol)
