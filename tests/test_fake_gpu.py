"""The GPU code paths, run on the CPU with fake_cupy (NumPy standing in for CuPy; see its docstring).

Each test compares the "device" run with the plain NumPy run in float64, where the two take
different code (the strided im2col instead of per-tap copies and Winograd, the fused SiLU kernels,
the whole batch in one conv GEMM, the flat buffers in one piece, the masks drawn on the device),
and watches what the steps read back to the host. These are no substitute for tests/test_gpu_parity.py
on a real GPU: they cannot see CuPy's own behaviour, only minidiff's logic on its GPU branches.
"""

import dataclasses

import numpy as np
import pytest

import fake_cupy
from device_checks import (
    OPTIMIZERS, check_bench_steps_read_nothing_back, check_optimizer_bit_for_bit, check_reverse_step_bit_for_bit,
    check_sampling_loop,
    check_trainer_steps_read_nothing_back, check_training_step,
)
from minidiff.backend import is_cupy_array, to_numpy
from minidiff.bench import run_bench
from minidiff.fast.ops import FAST
from minidiff.nn.ops import REFERENCE
from minidiff.nn.dropout import dropout_mask
from minidiff.model.config import get_preset

TOL = 1e-10  # float64, two code paths: rounding only


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


@pytest.mark.parametrize("fused", [True, False])  # FAST (the CUDA kernels) or REFERENCE (plain array ops on CuPy)
@pytest.mark.parametrize("one_buffer", [False, True])
@pytest.mark.parametrize("preset", ["tiny", "small"])  # small: >= 32 channels, Winograd on the CPU side
def test_a_training_step_on_the_gpu_path_matches_numpy(fake, preset, one_buffer, fused):
    check_training_step(dataclasses.replace(get_preset(preset), sample_size=8, dropout=0.1), one_buffer, TOL,
                        FAST if fused else REFERENCE)
    kernels = {"minidiff_silu_forward", "minidiff_silu_backward", "minidiff_gn_stats_double", "minidiff_gn_dot",
               "minidiff_gn_apply", "minidiff_gn_dot_centered", "minidiff_gn_k", "minidiff_gn_backward_apply",
               "minidiff_gn_apply_silu", "minidiff_gn_silu_grad_sum", "minidiff_gn_silu_grad_dot_centered",
               "minidiff_gn_silu_backward_apply",  # GroupNorm alone in the attention blocks, with SiLU elsewhere
               "minidiff_adam_update", "minidiff_im2col_double", "minidiff_col2im32",  # float64; small arrays:
               "minidiff_bias_nchw32"}  # col2im's and bias_nchw's 32-bit kernels
    assert set(fake.kernels_called) == (kernels if fused else set())


@pytest.mark.parametrize("fused", [True, False])  # FAST (fast/optim.py: one kernel per update) or REFERENCE
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_updates_on_the_gpu_path_are_bit_for_bit_numpy(fake, name, dtype, fused):
    check_optimizer_bit_for_bit(OPTIMIZERS[name], dtype, FAST if fused else REFERENCE)
    want = {"minidiff_adam_update", "minidiff_ema_update"} if fused else set()
    assert set(fake.kernels_called) == want


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_reverse_step_kernel_on_the_gpu_path_is_bit_for_bit_numpy(fake, monkeypatch, dtype):
    check_reverse_step_bit_for_bit(monkeypatch, dtype)
    assert "minidiff_reverse_step" in fake.kernels_called
    from minidiff.diffusion.schedule import make_schedule

    schedule, x = make_schedule(1000, "linear"), fake.asarray(np.ones((2, 3, 4, 4), dtype))
    assert fake_cupy.count(lambda: FAST.ddim_step(schedule, x, 500, 480, x))["ops"] == 1
    assert fake_cupy.count(lambda: FAST.ddpm_step(schedule, x, 500, 480, x, x))["ops"] == 1
    assert fake_cupy.count(lambda: REFERENCE.ddim_step(schedule, x, 500, 480, x))["ops"] == 6
    assert fake_cupy.count(lambda: REFERENCE.ddpm_step(schedule, x, 500, 480, x, x))["ops"] == 8


def test_dropout_masks_are_drawn_on_the_device(fake):
    got = dropout_mask(12345, (4, 3, 5, 5), 0.2, rows=(1, 3), xp=fake)
    assert is_cupy_array(got)
    np.testing.assert_array_equal(to_numpy(got), dropout_mask(12345, (4, 3, 5, 5), 0.2, rows=(1, 3)))


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_the_sampling_loop_on_the_gpu_path_matches_numpy(fake, sampler, eta):
    check_sampling_loop(sampler, eta, TOL)


@pytest.mark.parametrize("conditioning", ["class", "text"])
def test_trainer_steps_on_the_gpu_path_read_nothing_back(fake, tmp_path, monkeypatch, conditioning):
    check_trainer_steps_read_nothing_back(tmp_path, monkeypatch, conditioning, 1e-12)


def test_the_bench_runs_on_the_gpu_path(fake):
    rows = run_bench("tiny", batch=2, device="gpu", repeats=1, warmup=0, use_torch=False, log=lambda *a: None)
    assert [r["what"] for r in rows][:2] == ["train step (ms)", "sample step (ms)"]
    assert all(r["device"] == "gpu" and r["minidiff"] > 0 for r in rows[:2])


def test_the_fake_records_host_reads_of_device_values(fake):
    """What the steps' checks rely on: float(), bool(), item() and tolist() of a device array are recorded."""
    a = fake.asarray(np.array([1.5, -2.0]))
    fake_cupy.IMPLICIT_READS.clear()
    float(a[0]), bool(a[1] > 0), a.max().item(), a.tolist()
    assert [name for name, _ in fake_cupy.IMPLICIT_READS] == ["__float__", "__bool__", "item", "tolist"]
    fake_cupy.IMPLICIT_READS.clear()
    _ = a * 2 + a.sum()  # device arithmetic reads nothing
    assert fake_cupy.IMPLICIT_READS == []


def test_classifier_training_on_the_gpu_path_reads_its_losses_once_per_log(fake, tmp_path, monkeypatch):
    """train-classifier keeps each step's loss and accuracy on the device and reads them in one copy per
    --log-every (here once, at the last of 3 steps); its numbers are the CPU run's."""
    from minidiff.training.classifier import ClassifierTrainConfig, train_classifier

    rng = np.random.default_rng(0)
    labels = np.arange(16) % 2
    colors = np.array([[220, 40, 40], [40, 40, 220]])[labels][:, None, None]  # red (0) and blue (1), jittered
    images = np.clip(colors + rng.integers(-20, 21, (16, 8, 8, 3)),
                     0, 255)
    np.savez(tmp_path / "two.npz", images=images.astype(np.uint8), labels=labels)
    runs = {}
    for device in ("cpu", "gpu"):
        cfg = ClassifierTrainConfig(data=str(tmp_path / "two.npz"), out=str(tmp_path / device), preset="tiny",
                                    steps=3, batch_size=4, log_every=10, save_every=100, device=device,
                                    dtype="float64")
        fake_cupy.IMPLICIT_READS.clear()
        runs[device] = train_classifier(cfg, log=lambda *a: None)
    assert fake_cupy.IMPLICIT_READS == [("tolist", (6,))]  # 3 losses and 3 accuracies, read together
    np.testing.assert_allclose(runs["gpu"]["losses"], runs["cpu"]["losses"], rtol=1e-10)
    assert runs["gpu"]["accuracies"] == runs["cpu"]["accuracies"]


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_the_fused_kernels_cut_the_device_operations_of_a_step(fake, tmp_path, monkeypatch, capsys, preset):
    """Device operations (each about one kernel launch or cuBLAS call on CuPy, counted by the fake) of one
    Trainer step and one DDIM sampling step, with the REFERENCE ops (plain array ops) and with FAST (the kernels)."""
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer

    counts = {}
    for fused in (False, True):
        cfg = TrainConfig(out=str(tmp_path / f"{preset}{fused}"), preset=preset, device="gpu", steps=4, batch_size=2,
                          log_every=10, save_every=100, sample_every=0, threads=1)
        trainer = Trainer(cfg, log=lambda *a, **k: None, ops=FAST if fused else REFERENCE)
        trainer.train_step()  # the first step makes the kernels
        train = fake_cupy.count(trainer.train_step)
        b = trainer.bundle()
        x = fake.asarray(np.zeros((2, 3, b.image_size, b.image_size), np.float32))
        cond = b.encode(prompts=b.default_prompts(2), n=2) if b.conditioning == "text" else None
        cond = None if cond is None else fake.asarray(cond)
        t = fake.asarray(np.full(2, 500))  # on the device, as sampler.sample makes it (xp.full)
        ddim_step = (FAST if fused else REFERENCE).ddim_step
        sample = fake_cupy.count(lambda: ddim_step(b.schedule, b.model_fn(x, t, cond), 500, 480, x))
        counts[fused] = (train, sample)
    with capsys.disabled():
        print(f"\n{preset}: device ops per training step {counts[False][0]['ops']} -> {counts[True][0]['ops']} fused "
              f"(host -> device copies {counts[True][0]['h2d']}), per sampling step {counts[False][1]['ops']} -> "
              f"{counts[True][1]['ops']} (copies {counts[True][1]['h2d']})")
    assert counts[True][0]["ops"] < counts[False][0]["ops"] and counts[True][1]["ops"] < counts[False][1]["ops"]
    # a sampling step copies nothing to the device: DDIM's coefficients and attention's -inf are kernel arguments
    assert counts[False][1]["h2d"] == counts[True][1]["h2d"] == 0


def test_bench_steps_read_nothing_back_from_the_gpu(fake, monkeypatch):
    check_bench_steps_read_nothing_back(monkeypatch)
