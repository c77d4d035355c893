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

from device_checks import (  # noqa: E402
    OPTIMIZERS, check_bench_steps_read_nothing_back, check_optimizer_bit_for_bit, check_reverse_step_bit_for_bit,
    check_sampling_loop,
    check_trainer_steps_read_nothing_back, check_training_step, randn,
)
from gradcheck import rel_error  # noqa: E402
from minidiff import backend, bench  # noqa: E402
from minidiff.backend import gpu_available, is_cupy_array, to_device, to_numpy  # noqa: E402
from minidiff.nn import (  # noqa: E402
    avgpool2x2_backward, avgpool2x2_forward, dropout_backward, dropout_forward, dropout_mask, embedding_backward,
    embedding_forward,
    groupnorm_backward, groupnorm_forward, groupnorm_silu_backward, groupnorm_silu_forward, linear_backward, linear_forward, mha_backward, mha_forward,
    mse_backward, mse_forward, sdpa_backward, sdpa_forward, silu_backward, silu_forward,
    timestep_embedding_backward, timestep_embedding_forward, upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)
from minidiff.fast.cuda import im2col as im2col_cuda  # noqa: E402
from minidiff.fast.ops import FAST  # noqa: E402
from minidiff.nn.ops import REFERENCE  # noqa: E402
from minidiff.model.config import get_preset  # noqa: E402

if not gpu_available():
    pytest.skip("needs CuPy with a CUDA device (pip install 'minidiff[gpu]')", allow_module_level=True)

pytestmark = pytest.mark.gpu
TOL = 1e-10


def assert_parity(fn, *host_args, zero_outputs=()):
    """fn(*args) -> tuple of arrays (or None), run on the host arrays and on their CuPy copies.

    zero_outputs: indices of outputs that are exactly 0 in exact arithmetic (each side then holds only
    its own rounding, ~1e-16 of the terms that cancel, so a relative error between the two means
    nothing): both sides must be below 1e-12 of the largest output instead.
    """
    dev_args = [to_device(a, "gpu") if isinstance(a, np.ndarray) else a for a in host_args]
    want, got = fn(*host_args), fn(*dev_args)
    assert len(want) == len(got)
    for i, (w, g) in enumerate(zip(want, got)):
        assert (w is None) == (g is None), i
        if w is None:
            continue
        assert isinstance(g, cupy.ndarray), f"output {i} left the GPU: {type(g)}"
        assert g.dtype == w.dtype and g.shape == w.shape, i
        if i in zero_outputs:
            scale = max(float(np.abs(a).max()) for a in want if a is not None)
            assert max(float(np.abs(w).max()), float(abs(g).max())) < 1e-12 * scale, (i, "not ~0", scale)
            continue
        assert rel_error(to_numpy(g), w) < TOL, (i, rel_error(to_numpy(g), w))


def fwd_bwd(forward, backward, dy_seed=9):
    """(y, *grads) of a forward/backward pair, for a random upstream gradient drawn on the host."""
    def run(*args):
        y, cache = forward(*args)
        dy = randn(*y.shape, seed=dy_seed)
        dy = to_device(dy, "gpu") if is_cupy_array(y) else dy
        grads = backward(dy, cache)
        return (y, *(grads if isinstance(grads, tuple) else (grads,)))
    return run


@pytest.mark.parametrize("stride,padding,c_in,c_out,k", [
    (1, 1, 4, 6, 3),  # the U-Net's 3x3 conv (dx gathered as a flipped conv)
    (2, (0, 1, 0, 1), 4, 4, 3),  # diffusers' downsampling (dx by col2im)
    (1, 1, 1, 6, 3),  # conv_in-like: C_out > 2 C_in (dx by col2im)
    (1, 0, 4, 6, 1),  # the 1x1 shortcut
])
@pytest.mark.parametrize("ops", ["fast", "reference", "big"])  # im2col / col2im as one kernel each, or as array ops
def test_conv2d(monkeypatch, stride, padding, c_in, c_out, k, ops):
    """The conv of FAST (fast/conv.py: its CUDA kernels on CuPy) and of REFERENCE (nn/conv2d.py: array ops)."""
    if ops == "big":  # the paths for huge arrays, on small ones: col2im's 64-bit kernel, im2col's grid
        monkeypatch.setattr(im2col_cuda, "_bits", lambda *arrays: "")  # loops (past 65535 rows or samples)
        monkeypatch.setattr(im2col_cuda, "GRID_YZ", 2)
    table = REFERENCE if ops == "reference" else FAST
    run = fwd_bwd(lambda x, w, b: table.conv2d_forward(x, w, b, stride, padding), table.conv2d_backward)
    assert_parity(run, randn(3, c_in, 7, 6), randn(c_out, c_in, k, k, seed=1), randn(c_out, seed=2))


def test_linear():
    run = fwd_bwd(linear_forward, linear_backward)
    assert_parity(run, randn(2, 5, 7), randn(4, 7, seed=1), randn(4, seed=2))


def test_groupnorm_and_silu():
    assert_parity(fwd_bwd(lambda x, g, b: groupnorm_forward(x, g, b, 3, 1e-5), groupnorm_backward),
                  randn(2, 6, 4, 5), 1 + randn(6, seed=1), randn(6, seed=2))
    assert_parity(fwd_bwd(silu_forward, silu_backward), 4 * randn(3, 4, 5))


@pytest.mark.parametrize("fused", [True, False])
def test_silu_fused_kernels_and_plain_ops(fused):
    """SiLU on CuPy: FAST runs one kernel each way (fast/cuda/silu.py), REFERENCE the array ops: both match
    NumPy's reference, in float64 to TOL and in float32 to a few ulp, the tails (|x| up to 200: exp
    overflows) included."""
    ops = FAST if fused else REFERENCE
    x = 40 * randn(3, 4, 5)
    x[0, 0, :3] = (-200.0, 200.0, 0.0)
    assert_parity(fwd_bwd(ops.silu_forward, ops.silu_backward), x)
    x32, dy32 = x.astype(np.float32), randn(3, 4, 5, seed=9).astype(np.float32)
    y, cache = silu_forward(x32)
    y_g, cache_g = ops.silu_forward(to_device(x32, "gpu"))
    assert y_g.dtype == np.float32 and rel_error(to_numpy(y_g), y) < 1e-6
    dx_g = ops.silu_backward(to_device(dy32, "gpu"), cache_g)
    assert dx_g.dtype == np.float32 and rel_error(to_numpy(dx_g), silu_backward(dy32, cache)) < 1e-6


@pytest.mark.parametrize("fused", [True, False])
def test_groupnorm_fused_kernels_and_plain_ops(fused):
    """GroupNorm on CuPy (FAST: fast/cuda/groupnorm.py, 2 kernels forward, 8 backward; REFERENCE: the array
    ops) matches NumPy in float64 to TOL and in float32 to ~1e-5, with a large group mean (as on the
    CPU, the sums are taken on x - mean), spatial and no spatial dims, one group and G = C. The host side
    runs the same table (FAST: the CPU fold) and, in float32, the reference."""
    ops = FAST if fused else REFERENCE
    for shape, groups in (((2, 6, 4, 5), 3), ((3, 4), 1), ((2, 4, 3, 3), 4)):
        c = shape[1]
        x = 30 + randn(*shape)
        assert_parity(fwd_bwd(lambda x, g, b: ops.groupnorm_forward(x, g, b, groups, 1e-5), ops.groupnorm_backward),
                      x, 1 + randn(c, seed=1), randn(c, seed=2))
        host = [a.astype(np.float32) for a in (x, 1 + randn(c, seed=1), randn(c, seed=2), randn(*shape, seed=9))]
        y, cache = groupnorm_forward(*host[:3], groups, 1e-5)
        y_g, cache_g = ops.groupnorm_forward(*(to_device(a, "gpu") for a in host[:3]), groups, 1e-5)
        # float32, mean 30: each side's mean is off by ~30 * 1e-7 in its own summation order (the fake
        # CuPy, NumPy with the fused grouping, differs by 1.5e-7 at most); an indexing bug gives O(1)
        assert y_g.dtype == np.float32 and rel_error(to_numpy(y_g), y) < 1e-5
        for got, want in zip(ops.groupnorm_backward(to_device(host[3], "gpu"), cache_g),
                             groupnorm_backward(host[3], cache)):
            assert got.dtype == np.float32 and rel_error(to_numpy(got), want) < 5e-5


@pytest.mark.parametrize("fused", [True, False])
def test_groupnorm_silu_fused_kernels_and_plain_ops(fused):
    """silu(GroupNorm(x)) on CuPy (FAST: GroupNorm's kernels with SiLU applied in them, h recomputed in the
    backward; REFERENCE: the two ops in turn) matches NumPy: float64 to TOL, float32 to ~1e-5."""
    ops = FAST if fused else REFERENCE
    for shape, groups in (((2, 6, 4, 5), 3), ((3, 6), 1), ((2, 4, 3, 3), 4)):
        c = shape[1]
        x = 3 + 2 * randn(*shape)
        assert_parity(fwd_bwd(lambda x, g, b: ops.groupnorm_silu_forward(x, g, b, groups, 1e-5),
                              ops.groupnorm_silu_backward),
                      x, 1 + randn(c, seed=1), randn(c, seed=2))
        host = [a.astype(np.float32) for a in (x, 1 + randn(c, seed=1), randn(c, seed=2), randn(*shape, seed=9))]
        y, cache = groupnorm_silu_forward(*host[:3], groups, 1e-5)
        y_g, cache_g = ops.groupnorm_silu_forward(*(to_device(a, "gpu") for a in host[:3]), groups, 1e-5)
        assert (cache_g[1] is None) == fused  # fused: h is not kept
        assert y_g.dtype == np.float32 and rel_error(to_numpy(y_g), y) < 1e-5
        for got, want in zip(ops.groupnorm_silu_backward(to_device(host[3], "gpu"), cache_g),
                             groupnorm_silu_backward(host[3], cache)):
            assert got.dtype == np.float32 and rel_error(to_numpy(got), want) < 5e-5


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_updates_bit_for_bit(name, dtype, fused):
    """Adam/AdamW and the EMA on CuPy, FAST's one kernel per update (fast/optim.py, fast/cuda/optim.py, compiled
    with --fmad=false) or REFERENCE's array ops, round every operation as NumPy does: the same numbers to the
    last bit, float32 and float64."""
    check_optimizer_bit_for_bit(OPTIMIZERS[name], dtype, FAST if fused else REFERENCE)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reverse_step_bit_for_bit(monkeypatch, dtype):
    """The DDPM / DDIM step on CuPy in one kernel (sampler_cuda.py, --fmad=false) rounds every operation as
    NumPy's array ops do: the same x_prev and x0^ to the last bit."""
    check_reverse_step_bit_for_bit(monkeypatch, dtype)


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
    # outputs (y, dx, dcontext, dwq, dbq, dwk, dbk, ...): dbk (6) is 0, since the key bias adds q . bk to
    # every score of a query's row and softmax does not change when a row is shifted (found on an H100:
    # cuBLAS's rounding of that 0 differs from OpenBLAS's by 13%, both ~1e-15)
    assert_parity(run, randn(2, 3, 6, seed=20), *w, randn(2, 4, 5, seed=21), mask, zero_outputs=(6,))


def test_resampling_and_mse():
    assert_parity(fwd_bwd(upsample_nearest2x_forward, upsample_nearest2x_backward), randn(2, 3, 4, 5))
    assert_parity(fwd_bwd(avgpool2x2_forward, avgpool2x2_backward), randn(2, 3, 5, 6))
    for pad in (0, 1):
        for table in (REFERENCE, FAST):  # nn/resample.py's and fast/conv.py's stride-2 conv
            run = fwd_bwd(lambda x, w, b: table.downsample_forward(x, w, b, padding=pad), table.downsample_backward)
            assert_parity(run, randn(2, 3, 6, 7), randn(4, 3, 3, 3, seed=1), randn(4, seed=2))

    def mse(pred, target):
        loss, cache = mse_forward(pred, target)
        return (loss, *mse_backward(1.0, cache))
    assert_parity(mse, randn(3, 4), randn(3, 4, seed=1))


@pytest.mark.parametrize("one_buffer", [False, True])
def test_whole_training_step(one_buffer):
    check_training_step(dataclasses.replace(get_preset("tiny"), dropout=0.1), one_buffer, TOL)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_sampling_loop(sampler, eta):
    check_sampling_loop(sampler, eta, TOL)


def test_bench_on_gpu():
    rows = bench.run_bench("tiny", batch=2, device="gpu", repeats=1, warmup=0, use_torch=True, log=lambda *a: None)
    assert [r["what"] for r in rows][:2] == ["train step (ms)", "sample step (ms)"]
    assert all(r["device"] == "gpu" and r["minidiff"] > 0 for r in rows)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_train_steps_read_nothing_back_from_the_gpu(tmp_path, monkeypatch, conditioning):
    check_trainer_steps_read_nothing_back(tmp_path, monkeypatch, conditioning, 1e-10)


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


def test_bench_steps_read_nothing_back_from_the_gpu(monkeypatch):
    check_bench_steps_read_nothing_back(monkeypatch)
