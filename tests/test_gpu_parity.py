"""NumPy float64 vs CuPy float64: every nn op (forward and backward), a whole training step of the
tiny U-Net (loss, gradients, parameters after AdamW), the DDIM/DDPM sampling loop, and the bench.

Skipped cleanly unless CuPy imports and sees a CUDA device (minidiff.backend.gpu_available()).
The same host arrays go to both backends, and every random draw is made on the host, so the two
runs compute the same numbers up to summation order: cuBLAS/CUB reduce in a different order than
OpenBLAS/NumPy, which in float64 moves results by ~1e-15 relative. TOL = 1e-10 leaves five orders
of margin for the deep U-Net, while any indexing or layout bug gives an O(1) error.
"""

import dataclasses

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

from gradcheck import grads_rel_error, rel_error  # noqa: E402
from minidiff import backend, bench, flat  # noqa: E402
from minidiff.backend import gpu_available, to_device, to_numpy  # noqa: E402
from minidiff.loss import diffusion_loss  # noqa: E402
from minidiff.nn import (  # noqa: E402
    avgpool2x2_backward, avgpool2x2_forward, conv2d_backward, conv2d_forward, downsample_backward,
    downsample_forward, dropout_backward, dropout_forward, dropout_mask, embedding_backward, embedding_forward,
    groupnorm_backward, groupnorm_forward, linear_backward, linear_forward, mha_backward, mha_forward,
    mse_backward, mse_forward, sdpa_backward, sdpa_forward, silu_backward, silu_forward,
    timestep_embedding_backward, timestep_embedding_forward, upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)
from minidiff.optim import AdamW, clip_grad_norm  # noqa: E402
from minidiff.sampler import sample  # noqa: E402
from minidiff.schedule import add_noise, make_schedule  # noqa: E402
from minidiff.unet import init_params, unet_backward, unet_forward  # noqa: E402
from minidiff.unet_config import get_preset  # noqa: E402

if not gpu_available():
    pytest.skip("needs CuPy with a CUDA device (pip install 'minidiff[gpu]')", allow_module_level=True)

pytestmark = pytest.mark.gpu
TOL = 1e-10


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def assert_parity(fn, *host_args):
    """fn(*args) -> tuple of arrays (or None), run on the host arrays and on their CuPy copies."""
    dev_args = [to_device(a, "gpu") if isinstance(a, np.ndarray) else a for a in host_args]
    want, got = fn(*host_args), fn(*dev_args)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert (w is None) == (g is None), i
        if w is None:
            continue
        assert isinstance(g, cupy.ndarray), f"output {i} left the GPU: {type(g)}"
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert rel_error(to_numpy(g), w) < TOL, (i, rel_error(to_numpy(g), w))


def fwd_bwd(forward, backward, dy_seed=9):
    """(y, *grads) of a forward/backward pair, for a random upstream gradient drawn on the host."""
    def run(*args):
        y, cache = forward(*args)
        dy = randn(*y.shape, seed=dy_seed)
        dy = dy if isinstance(y, np.ndarray) else to_device(dy, "gpu")
        grads = backward(dy, cache)
        return (y, *(grads if isinstance(grads, tuple) else (grads,)))
    return run


@pytest.mark.parametrize("stride,padding,c_in,c_out,k", [
    (1, 1, 4, 6, 3),  # the U-Net's 3x3 conv (dx gathered as a flipped conv)
    (2, (0, 1, 0, 1), 4, 4, 3),  # diffusers' downsampling (dx by col2im)
    (1, 1, 1, 6, 3),  # conv_in-like: C_out > 2 C_in (dx by col2im)
    (1, 0, 4, 6, 1),  # the 1x1 shortcut
])
def test_conv2d(stride, padding, c_in, c_out, k):
    run = fwd_bwd(lambda x, w, b: conv2d_forward(x, w, b, stride, padding), conv2d_backward)
    assert_parity(run, randn(3, c_in, 7, 6), randn(c_out, c_in, k, k, seed=1), randn(c_out, seed=2))


def test_linear():
    run = fwd_bwd(linear_forward, linear_backward)
    assert_parity(run, randn(2, 5, 7), randn(4, 7, seed=1), randn(4, seed=2))


def test_groupnorm_and_silu():
    assert_parity(fwd_bwd(lambda x, g, b: groupnorm_forward(x, g, b, 3, 1e-5), groupnorm_backward),
                  randn(2, 6, 4, 5), 1 + randn(6, seed=1), randn(6, seed=2))
    assert_parity(fwd_bwd(silu_forward, silu_backward), 4 * randn(3, 4, 5))


@pytest.mark.parametrize("fused", [True, False])
def test_silu_fused_kernels_and_plain_ops(monkeypatch, fused):
    """SiLU on CuPy runs one fused kernel each way (MINIDIFF_FUSED=0: the array ops): both match NumPy,
    in float64 to TOL and in float32 to a few ulp, the tails (|x| up to 200: exp overflows) included."""
    monkeypatch.setattr(backend, "FUSED", fused)
    x = 40 * randn(3, 4, 5)
    x[0, 0, :3] = (-200.0, 200.0, 0.0)
    assert_parity(fwd_bwd(silu_forward, silu_backward), x)
    x32, dy32 = x.astype(np.float32), randn(3, 4, 5, seed=9).astype(np.float32)
    y, cache = silu_forward(x32)
    y_g, cache_g = silu_forward(to_device(x32, "gpu"))
    assert y_g.dtype == np.float32 and rel_error(to_numpy(y_g), y) < 1e-6
    dx_g = silu_backward(to_device(dy32, "gpu"), cache_g)
    assert dx_g.dtype == np.float32 and rel_error(to_numpy(dx_g), silu_backward(dy32, cache)) < 1e-6


def test_dropout_same_mask():
    run = fwd_bwd(lambda x: dropout_forward(x, 0.3, train=True, seed=123), dropout_backward)
    assert_parity(run, randn(4, 8, 3))
    # drawn on the GPU (SplitMix64 in uint64 ops), bit for bit the host's mask, whole or by rows
    for rows in (None, (2, 5)):
        got = dropout_mask(2**63 + 11, (6, 5, 7, 7), 0.1, rows, xp=cupy)
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_array_equal(to_numpy(got), dropout_mask(2**63 + 11, (6, 5, 7, 7), 0.1, rows))


def test_embeddings():
    ids = np.array([[0, 3, 1], [4, 4, 2]])
    assert_parity(lambda i, w: fwd_bwd(embedding_forward, embedding_backward)(i, w), ids, randn(5, 6))
    t = np.array([0.0, 17.5, 999.0])
    run = fwd_bwd(lambda t: timestep_embedding_forward(t, 10, flip_sin_to_cos=True, downscale_freq_shift=0),
                  timestep_embedding_backward)
    assert_parity(run, t)


def test_attention():
    mask = np.array([[True, False, True, True], [True, True, True, False]])
    run = fwd_bwd(lambda q, k, v, m: sdpa_forward(q, k, v, m), sdpa_backward)
    assert_parity(run, randn(2, 3, 5, 4), randn(2, 3, 4, 4, seed=1), randn(2, 3, 4, 6, seed=2), mask)
    w = [randn(*s, seed=i) for i, s in enumerate([(8, 6), (8,), (8, 5), (8,), (8, 5), (8,), (6, 8), (6,)])]
    run = fwd_bwd(lambda x, *a: mha_forward(x, *a[:8], 2, context=a[8], mask=a[9]), mha_backward)
    assert_parity(run, randn(2, 3, 6, seed=20), *w, randn(2, 4, 5, seed=21), mask)


def test_resampling_and_mse():
    assert_parity(fwd_bwd(upsample_nearest2x_forward, upsample_nearest2x_backward), randn(2, 3, 4, 5))
    assert_parity(fwd_bwd(avgpool2x2_forward, avgpool2x2_backward), randn(2, 3, 5, 6))
    for pad in (0, 1):
        run = fwd_bwd(lambda x, w, b: downsample_forward(x, w, b, padding=pad), downsample_backward)
        assert_parity(run, randn(2, 3, 6, 7), randn(4, 3, 3, 3, seed=1), randn(4, seed=2))

    def mse(pred, target):
        loss, cache = mse_forward(pred, target)
        return (loss, *mse_backward(1.0, cache))
    assert_parity(mse, randn(3, 4), randn(3, 4, seed=1))


def training_step(device, one_buffer=False):
    """One step of DDPM training of the tiny U-Net (dropout on, drawn on the host) on one backend;
    one_buffer: params, grads and AdamW state in one flat buffer each, as the Trainer has them."""
    config = dataclasses.replace(get_preset("tiny"), dropout=0.1)
    schedule = make_schedule(1000, "linear")
    params = to_device(init_params(config, seed=0, dtype=np.float64), device)
    params = flat.flatten(params) if one_buffer else params
    opt = AdamW(params, lr=1e-3)
    x0, noise = randn(3, 3, 8, 8, seed=1), randn(3, 3, 8, 8, seed=2)
    t = np.array([5, 500, 999])
    x0, noise, t = (to_device(a, device) for a in (x0, noise, t))
    x_t = add_noise(schedule, x0, noise, t)
    eps, cache = unet_forward(params, config, x_t, t, train=True, rng=np.random.default_rng(7))
    loss, deps = diffusion_loss(schedule, eps, x0, noise, t)
    grads, dx = unet_backward(deps, cache)
    grads = flat.gather(grads, like=params)  # unchanged unless params is flat
    norm = clip_grad_norm(grads, 0.05)  # small max_norm: the clipping branch runs
    opt.step(params, grads)
    return loss, norm, grads, dx, params


@pytest.mark.parametrize("one_buffer", [False, True])
def test_whole_training_step(one_buffer):
    loss_c, norm_c, grads_c, dx_c, params_c = training_step("cpu", one_buffer)
    loss_g, norm_g, grads_g, dx_g, params_g = training_step("gpu", one_buffer)
    if one_buffer:
        assert flat.buffers(params_g, grads_g) is not None and isinstance(params_g.buffer, cupy.ndarray)
    assert abs(float(loss_g) - float(loss_c)) <= TOL * abs(float(loss_c))
    assert abs(float(norm_g) - float(norm_c)) <= TOL * float(norm_c) and float(norm_c) > 0.05
    assert list(grads_g) == list(grads_c) and list(params_g) == list(params_c)
    grad_errors = grads_rel_error(grads_g, grads_c)  # zero-in-exact-arithmetic gradients: see its floor
    for key in grads_c:
        assert grad_errors[key] < TOL, (key, grad_errors[key])
        assert rel_error(to_numpy(params_g[key]), params_c[key]) < TOL, key
    assert rel_error(to_numpy(dx_g), dx_c) < TOL


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_loop(sampler, eta):
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
    assert isinstance(out["gpu"], cupy.ndarray)
    assert rel_error(to_numpy(out["gpu"]), out["cpu"]) < TOL


def test_bench_on_gpu():
    rows = bench.run_bench("tiny", batch=2, device="gpu", repeats=1, warmup=0, use_torch=True, log=lambda *a: None)
    assert [r["what"] for r in rows][:2] == ["train step (ms)", "sample step (ms)"]
    assert all(r["device"] == "gpu" and r["minidiff"] > 0 for r in rows)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_train_steps_read_nothing_back_from_the_gpu(tmp_path, monkeypatch, conditioning):
    """Between two loss reads the Trainer's steps copy nothing from the GPU to the host (each such
    copy waits for the GPU): every to_numpy of minidiff is watched for CuPy arrays."""
    import sys

    from minidiff.config import TrainConfig
    from minidiff.train import Trainer

    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), preset="tiny", device="gpu", steps=3, batch_size=4,
                                  conditioning=conditioning, log_every=10, save_every=100, sample_every=0),
                      log=lambda *a, **k: None)
    assert trainer.flush_every == 10
    read_back = []
    for name, module in list(sys.modules.items()):
        if name.startswith("minidiff") and hasattr(module, "to_numpy"):
            original = module.to_numpy

            def watched(x, _original=original, _name=name):
                if isinstance(x, cupy.ndarray):
                    read_back.append((_name, x.shape))
                return _original(x)
            monkeypatch.setattr(module, "to_numpy", watched)
    for _ in range(3):
        trainer.train_step()
    assert read_back == []
    assert len(trainer.pending) == 3 and trainer.flush_losses() is not None


def test_tf32_only_when_asked():
    """--tf32 switches CuPy's float32 matmuls to TF32 (error ~1e-3 relative), and back."""
    from minidiff.backend import set_tf32

    a, b = randn(256, 256, seed=1), randn(256, 256, seed=2)
    exact = a @ b
    a32, b32 = (cupy.asarray(m, dtype=cupy.float32) for m in (a, b))

    def error():
        return rel_error(to_numpy(a32 @ b32).astype(np.float64), exact)

    set_tf32(False)
    assert error() < 1e-5  # float32: ~1e-6
    set_tf32(True)
    try:
        assert error() > 5e-5  # TF32 products keep 10 mantissa bits
    finally:
        set_tf32(False)
    assert error() < 1e-5
