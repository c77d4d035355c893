"""fast/sampler.py against diffusion/sampler.py: the same numbers, bit for bit.

On NumPy the fast steps are the reference steps. On CuPy (here the fake CuPy of tests/fake_cupy.py,
which emulates the kernel's body line for line; tests/test_gpu_parity.py runs the real kernel) a step
with one timestep and a fixed variance is one kernel that rounds every operation as the reference's
array ops do, so x_prev and x0^ agree to the last bit; every other step calls the reference.
"""

import numpy as np
import pytest

import fake_cupy
from device_checks import REVERSE_STEPS, check_reverse_step_bit_for_bit, randn
from minidiff.backend import is_cupy_array, to_device, to_numpy
from minidiff.diffusion import sampler as reference
from minidiff.diffusion.schedule import make_schedule
from minidiff.fast import sampler as fast
from minidiff.fast.ops import FAST

SCHEDULE = make_schedule(1000, "linear")


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


def inputs(i, dtype=np.float64, shape=(3, 2, 5, 4)):
    return [1.5 * randn(*shape, seed=10 * i + j).astype(dtype) for j in range(3)]  # model_output, x, z


def test_the_table_holds_the_fast_steps():
    assert FAST.ddpm_step is fast.ddpm_step and FAST.ddim_step is fast.ddim_step


@pytest.mark.parametrize("case", range(len(REVERSE_STEPS)))
def test_on_numpy_the_fast_step_is_the_reference_step(case):
    name, t, prev_t, kwargs = REVERSE_STEPS[case]
    out, x, z = inputs(case)
    want = getattr(reference, f"{name}_step")(SCHEDULE, out, t, prev_t, x, noise=z, **kwargs)
    got = getattr(fast, f"{name}_step")(SCHEDULE, out, t, prev_t, x, noise=z, **kwargs)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_on_cupy_one_kernel_per_step_bit_for_bit(fake, monkeypatch, dtype):
    """Every branch of the kernel (prediction types, variance types, clipping, use_clipped_model_output,
    t = 0, prev_t = -1, eta > 0) against the reference on NumPy (tests/device_checks.py)."""
    check_reverse_step_bit_for_bit(monkeypatch, dtype)
    assert set(fake.kernels_called) == {"minidiff_reverse_step"}


@pytest.mark.parametrize("case", range(len(REVERSE_STEPS)))
def test_on_cupy_the_float32_schedule_runs_the_reference_step(fake, case):
    """make_schedule(schedule_dtype="float32") rounds the step's host arithmetic as diffusers does; the kernel
    takes float64 coefficients, so that oracle mode runs the reference step, bit for bit its numbers."""
    schedule = make_schedule(1000, "linear", schedule_dtype="float32")
    name, t, prev_t, kwargs = REVERSE_STEPS[case]
    out, x, z = inputs(case)
    want = getattr(reference, f"{name}_step")(schedule, out, t, prev_t, x, noise=z, **kwargs)
    got = getattr(fast, f"{name}_step")(schedule, *(to_device(a, "gpu") for a in (out,)), t, prev_t,
                                         to_device(x, "gpu"), noise=to_device(z, "gpu"), **kwargs)
    assert "minidiff_reverse_step" not in fake.kernels_called
    for g, w in zip(got, want):
        np.testing.assert_array_equal(to_numpy(g), w)


def test_on_cupy_a_step_is_one_device_operation(fake):
    x = fake.asarray(np.ones((2, 3, 4, 4)))
    assert fake_cupy.count(lambda: fast.ddim_step(SCHEDULE, x, 500, 480, x))["ops"] == 1  # 6 in the reference
    assert fake_cupy.count(lambda: fast.ddpm_step(SCHEDULE, x, 500, 480, x, x))["ops"] == 1  # 8 in the reference
    assert fake_cupy.count(lambda: reference.ddim_step(SCHEDULE, x, 500, 480, x))["ops"] == 6
    assert fake_cupy.count(lambda: reference.ddpm_step(SCHEDULE, x, 500, 480, x, x))["ops"] == 8


FALLBACKS = [  # (sampler, t, prev_t, keyword arguments, dtypes of (model_output, x, z)): the reference runs
    ("ddpm", np.array([500, 20, 0]), np.array([480, 0, -1]), {}, None),  # a timestep per item
    ("ddim", np.array([500, 20, 0]), np.array([480, 0, -1]), dict(eta=0.5), None),
    ("ddpm", 500, 480, dict(variance_type="learned_range"), None),  # the model's variance: (N, 2C, ...)
    ("ddpm", 500, 480, {}, (np.float32, np.float64, np.float64)),  # two dtypes: the kernel takes one
    ("ddim", 500, 480, dict(eta=1.0), (np.float64, np.float64, np.float32)),
]


@pytest.mark.parametrize("case", range(len(FALLBACKS)))
def test_on_cupy_other_steps_are_the_reference_step(fake, case):
    name, t, prev_t, kwargs, dtypes = FALLBACKS[case]
    out, x, z = inputs(case)
    if kwargs.get("variance_type") == "learned_range":
        out = np.concatenate([out, np.tanh(z)], axis=1)  # the variance channels in [-1, 1]
    if dtypes:
        out, x, z = (a.astype(d) for a, d in zip((out, x, z), dtypes))
    want = getattr(reference, f"{name}_step")(SCHEDULE, out, t, prev_t, x, noise=z, **kwargs)
    fake.kernels_called.clear()
    out_d, x_d, z_d = (to_device(a, "gpu") for a in (out, x, z))
    got = getattr(fast, f"{name}_step")(SCHEDULE, out_d, t, prev_t, x_d, noise=z_d, **kwargs)
    assert fake.kernels_called == []
    for g, w in zip(got, want):
        assert is_cupy_array(g)
        np.testing.assert_array_equal(to_numpy(g), w)


BAD = [  # the reference's checks, on the kernel path: (sampler, t, prev_t, keyword arguments, message)
    ("ddpm", 1000, 480, {}, r"t must lie in \[0, 1000\)"),
    ("ddpm", 500, 500, {}, "prev_t must be < t"),
    ("ddim", 500, 1000, {}, r"prev_t must lie in \[-1, 1000\)"),
    ("ddpm", 500, 480, dict(noise=None), "noise is required"),
    ("ddim", 500, 480, dict(eta=0.5, noise=None), "noise is required"),
    ("ddim", 500, 480, dict(eta=-1.0), "eta must be >= 0"),
    ("ddim", 999, 0, dict(eta=5.0), "eta = 5.0 is too large"),
    ("ddpm", 500, 480, dict(prediction_type="eps"), "prediction_type must be one of"),
    ("ddpm", 500, 480, dict(variance_type="small"), "variance_type must be one of"),
    ("ddpm", 500, 480, dict(noise="short"), "shape mismatch"),
    ("ddpm", 500, 480, dict(model_output="short"), "shape mismatch"),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_on_cupy_bad_input_gives_the_reference_error(fake, case):
    name, t, prev_t, kwargs, match = BAD[case]
    x = fake.asarray(np.ones((2, 3, 4)))
    short = fake.asarray(np.ones((2, 3, 3)))
    kwargs = {k: short if isinstance(v, str) and v == "short" else v for k, v in kwargs.items()}
    out = kwargs.pop("model_output", x)
    kwargs.setdefault("noise", x)
    for module in (reference, fast):
        with pytest.raises(ValueError, match=match):
            getattr(module, f"{name}_step")(SCHEDULE, out, t, prev_t, x, **kwargs)


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_the_sampling_loop_with_the_fast_steps(fake, sampler, eta):
    """sample(ops=FAST) on the device: one kernel per step, the CPU's reference samples bit for bit."""
    def model(x, t, cond):
        return 0.5 * x  # elementwise: the same numbers on both backends
    kw = dict(sampler=sampler, eta=eta, num_inference_steps=5, dtype=np.float64, seed=4)
    want = reference.sample(model, (2, 3, 4), SCHEDULE, device="cpu", **kw)
    fake.kernels_called.clear()
    got = reference.sample(model, (2, 3, 4), SCHEDULE, device="gpu", ops=FAST, **kw)
    assert fake.kernels_called == ["minidiff_reverse_step"] * 5
    np.testing.assert_array_equal(to_numpy(got), want)
