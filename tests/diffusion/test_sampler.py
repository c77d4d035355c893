"""Timestep lists, DDPM/DDIM steps and the sampling loop: hand-computed values, edge behaviour,
bad input. (Analytic-Gaussian properties: test_sampler_gaussian.py; diffusers: test_sampler_diffusers.py.)"""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidiff.diffusion import sampler as SM
from minidiff.diffusion import schedule as S
from minidiff.diffusion.timesteps import ddim_prev_timesteps, make_timesteps, prev_timesteps

# ----------------------------------------------------------------------------- timestep lists (T = 1000)

HAND = {  # written out by hand from the formulas in make_timesteps' docstring
    ("leading", 1): [0],
    ("trailing", 1): [999],           # round(1000) - 1
    ("linspace", 1): [0],             # linspace(0, 999, 1) = [0]
    ("leading", 7): [852, 710, 568, 426, 284, 142, 0],                 # T // n = 142
    ("trailing", 7): [999, 856, 713, 570, 428, 285, 142],              # round(1000 - k 142.857) - 1
    ("linspace", 7): [999, 832, 666, 500, 333, 166, 0],                # 166.5 -> 166, 499.5 -> 500, 832.5 -> 832
    ("leading", 13): [912, 836, 760, 684, 608, 532, 456, 380, 304, 228, 152, 76, 0],
    ("trailing", 13): [999, 922, 845, 768, 691, 614, 537, 461, 384, 307, 230, 153, 76],
    ("linspace", 13): [999, 916, 832, 749, 666, 583, 500, 416, 333, 250, 166, 83, 0],  # k * 83.25
    ("leading", 50): list(range(980, -1, -20)),
    ("trailing", 50): list(range(999, 0, -20)),
    ("linspace", 50): [round(Fraction(999 * k, 49)) for k in range(49, -1, -1)],  # exact rational, half to even
    ("leading", 1000): list(range(999, -1, -1)),
    ("trailing", 1000): list(range(999, -1, -1)),
    ("linspace", 1000): list(range(999, -1, -1)),
}


@pytest.mark.parametrize("spacing, n", sorted(HAND))
def test_timesteps_hand_values(spacing, n):
    ts = make_timesteps(1000, n, spacing)
    assert ts.dtype == np.int64 and ts.tolist() == HAND[spacing, n]
    # steps_offset shifts 'leading' only (diffusers ignores it for the other spacings)
    if spacing == "leading" and n < 1000:
        assert make_timesteps(1000, n, spacing, steps_offset=1).tolist() == [t + 1 for t in HAND[spacing, n]]
    elif spacing != "leading":
        assert make_timesteps(1000, n, spacing, steps_offset=1).tolist() == HAND[spacing, n]


def test_leading_offset_past_the_end_is_an_error():
    with pytest.raises(ValueError, match="steps_offset = 1 pushes the first 'leading' timestep to 1000"):
        make_timesteps(1000, 1000, "leading", steps_offset=1)


@settings(max_examples=50)
@given(st.integers(1, 1500), st.data())
def test_timesteps_are_n_descending_in_range(T, data):
    n = data.draw(st.integers(1, T))
    spacing = data.draw(st.sampled_from(["leading", "trailing", "linspace"]))
    ts = make_timesteps(T, n, spacing)
    assert ts.shape == (n,) and ts[0] < T and ts[-1] >= 0 and np.all(np.diff(ts) < 0)
    assert prev_timesteps(ts).tolist() == ts[1:].tolist() + [-1]
    if spacing == "leading":  # the DDIM rule t - T // n agrees with "next entry" only here
        np.testing.assert_array_equal(ddim_prev_timesteps(ts, T, n), prev_timesteps(ts))


# ----------------------------------------------------------------------------- variance types by hand

LIN = np.linspace(1e-4, 0.02, 1000)  # the linear schedule, written independently
AB = np.cumprod(1 - LIN)
V = 0.3                               # a model's variance output for the learned types


def hand_std(t, vt):
    """sigma for the step t -> t - 1 of the linear T = 1000 schedule, from DDPM eqs. 6-7."""
    ab_prev = AB[t - 1] if t > 0 else 1.0
    beta = 1 - AB[t] / ab_prev                                  # = LIN[t] when no step is skipped
    small = max((1 - ab_prev) / (1 - AB[t]) * beta, 1e-20)      # 0 at t = 0, floored at 1e-20
    f = (V + 1) / 2
    return {"fixed_small": small**0.5, "fixed_small_log": small**0.5, "fixed_large": beta**0.5,
            "fixed_large_log": beta**0.5, "learned": V**0.5,
            "learned_range": np.exp(0.5 * (f * np.log(beta) + (1 - f) * np.log(small)))}[vt]


@pytest.mark.parametrize("vt", SM.VARIANCE_TYPES)
@pytest.mark.parametrize("t", [0, 1, 999])
def test_variance_types_hand_values(vt, t):
    s = S.make_schedule()
    x = np.zeros((1, 1, 2))
    pv = np.full((1, 1, 2), V)
    got = SM.ddpm_std(s, t, t - 1, vt, predicted_variance=pv, like=x)
    np.testing.assert_allclose(np.broadcast_to(got, x.shape), hand_std(t, vt), rtol=1e-12)


def test_fixed_small_is_the_posterior_variance():
    """sigma_t^2 = beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (DDPM eq. 7), from the schedule's own
    arrays, for every t; beta~ = 0 at t = 0 is floored at 1e-20; at t = 1 the closed form in two betas."""
    s = S.make_schedule()
    ab, betas = s.alphas_cumprod, s.betas
    t = np.arange(1, 1000)
    posterior = (1 - ab[t - 1]) / (1 - ab[t]) * betas[t]
    np.testing.assert_allclose(SM.ddpm_std(s, t, t - 1, "fixed_small") ** 2, posterior, rtol=1e-10)
    np.testing.assert_allclose(SM.ddpm_std(s, t, t - 1, "fixed_large") ** 2, betas[t], rtol=1e-10)
    assert SM.ddpm_std(s, 0, -1, "fixed_small") == 1e-10
    b0, b1 = LIN[0], LIN[1]  # 1 - abar_1 = b0 + b1 - b0 b1
    assert SM.ddpm_std(s, 1, 0, "fixed_small") == pytest.approx((b0 * b1 / (b0 + b1 - b0 * b1)) ** 0.5, rel=1e-12)


def test_skipped_step_uses_abar_ratio_not_betas():
    s = S.make_schedule()
    beta = 1 - AB[500] / AB[480]
    assert SM.ddpm_std(s, 500, 480, "fixed_large") == pytest.approx(beta**0.5, rel=1e-12)
    assert abs(beta - LIN[500]) > 10 * LIN[500]  # the wrong formula would be far off


# ----------------------------------------------------------------------------- steps by hand

B4 = np.array([0.1, 0.2, 0.3, 0.4])
A4 = np.cumprod(1 - B4)


def test_ddpm_step_hand_values_with_skip():
    s = S.make_schedule(4, trained_betas=B4)
    x, e, z = np.array([[0.5, -1.0]]), np.array([[0.2, 0.3]]), np.array([[1.0, -2.0]])
    a, ap = A4[2], A4[0]                           # t = 2 -> prev_t = 0
    x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
    mean = ap**0.5 * (1 - a / ap) / (1 - a) * x0 + (a / ap) ** 0.5 * (1 - ap) / (1 - a) * x
    std = ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
    prev, pred_x0 = SM.ddpm_step(s, e, 2, 0, x, z)
    np.testing.assert_allclose(pred_x0, x0, rtol=1e-14)
    np.testing.assert_allclose(prev, mean + std * z, rtol=1e-14)
    # clip_sample clamps x0^ before the posterior mean
    prev_c, x0_c = SM.ddpm_step(s, e, 2, 0, x, z, clip_sample=True, clip_sample_range=0.5)
    np.testing.assert_allclose(x0_c, np.clip(x0, -0.5, 0.5), rtol=1e-14)
    mean_c = ap**0.5 * (1 - a / ap) / (1 - a) * np.clip(x0, -0.5, 0.5) + (a / ap) ** 0.5 * (1 - ap) / (1 - a) * x
    np.testing.assert_allclose(prev_c, mean_c + std * z, rtol=1e-14)


def test_ddpm_no_noise_at_t0_per_item():
    s = S.make_schedule(4, trained_betas=B4)
    x, e, z = np.ones((2, 3)), np.full((2, 3), 0.1), np.full((2, 3), 100.0)
    prev, _ = SM.ddpm_step(s, e, np.array([0, 3]), np.array([-1, 1]), x, z, variance_type="fixed_large")
    mean0, _ = SM.ddpm_step(s, e[:1], 0, -1, x[:1], None, variance_type="fixed_large")  # noise may be None at t=0
    np.testing.assert_array_equal(prev[0], mean0[0])
    mean3, _ = SM.ddpm_step(s, e[1:], 3, 1, x[1:], 0 * z[1:], variance_type="fixed_large")
    np.testing.assert_allclose(prev[1], mean3[0] + (1 - A4[3] / A4[1]) ** 0.5 * 100.0, rtol=1e-14)


def test_ddpm_learned_variance_splits_channels():
    s = S.make_schedule(4, trained_betas=B4)
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((2, 3, 2)), rng.standard_normal((2, 3, 2))
    out = np.concatenate([rng.standard_normal((2, 3, 2)), rng.uniform(-1, 1, (2, 3, 2))], axis=1)
    prev, x0 = SM.ddpm_step(s, out, 3, 2, x, z, variance_type="learned_range")
    mean, _ = SM.ddpm_step(s, out[:, :3], 3, 2, x, 0 * z)
    std = SM.ddpm_std(s, 3, 2, "learned_range", predicted_variance=out[:, 3:], like=x)
    np.testing.assert_allclose(prev, mean + std * z, rtol=1e-13)
    assert x0.shape == x.shape


def test_ddim_step_hand_values():
    s = S.make_schedule(4, trained_betas=B4)
    x, e, z = np.array([[0.5, -1.0]]), np.array([[0.2, 0.3]]), np.array([[1.0, -2.0]])
    for t, p, one, eta in [(3, 1, True, 0.0), (3, 1, True, 0.5), (1, -1, True, 1.0), (1, -1, False, 0.7)]:
        a = A4[t]
        ap = A4[p] if p >= 0 else (1.0 if one else A4[0])      # final_alpha_cumprod
        x0 = (x - (1 - a) ** 0.5 * e) / a**0.5
        sig = eta * ((1 - ap) / (1 - a) * (1 - a / ap)) ** 0.5
        want = ap**0.5 * x0 + (1 - ap - sig**2) ** 0.5 * e + sig * z
        got, _ = SM.ddim_step(s, e, t, p, x, eta, z, set_alpha_to_one=one)
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)


def test_ddim_use_clipped_model_output():
    s = S.make_schedule(4, trained_betas=B4)
    x, e = np.array([[3.0, -1.0]]), np.array([[-0.2, 0.3]])
    a, ap = A4[2], A4[0]
    x0c = np.clip((x - (1 - a) ** 0.5 * e) / a**0.5, -1, 1)
    ec = (x - a**0.5 * x0c) / (1 - a) ** 0.5
    got, _ = SM.ddim_step(s, e, 2, 0, x, clip_sample=True, use_clipped_model_output=True)
    np.testing.assert_allclose(got, ap**0.5 * x0c + (1 - ap) ** 0.5 * ec, rtol=1e-14)


@given(st.sampled_from(["ddpm", "ddim"]), st.integers(0, 2**31 - 1))
def test_per_item_steps_match_one_int_calls(sampler, seed):
    s = S.make_schedule(20, "squaredcos_cap_v2")
    rng = np.random.default_rng(seed)
    N = 4
    t = rng.integers(0, 20, N)
    p = np.array([rng.integers(-1, ti) if ti > 0 else -1 for ti in t])
    x, e, z = (rng.standard_normal((N, 2, 3)) for _ in range(3))
    step = (lambda *a: SM.ddpm_step(s, *a, variance_type="fixed_large")) if sampler == "ddpm" else \
        (lambda o, t_, p_, x_, z_: SM.ddim_step(s, o, t_, p_, x_, 0.6, z_))
    batched, _ = step(e, t, p, x, z)
    for i in range(N):
        one, _ = step(e[i:i + 1], int(t[i]), int(p[i]), x[i:i + 1], z[i:i + 1])
        np.testing.assert_allclose(batched[i], one[0], rtol=1e-13, atol=1e-14)


# ----------------------------------------------------------------------------- the loop


def toy_model(x, t, cond):
    return (0.1 * x + 0.01 * t.reshape((-1,) + (1,) * (x.ndim - 1))).astype(x.dtype)


def test_sample_loop_contract():
    s = S.make_schedule(100)
    seen = []
    x0, traj = SM.sample(lambda x, t, c: (seen.append((t.dtype, t.shape, c)), toy_model(x, t, c))[1],
                         (3, 2), s, "ddim", num_inference_steps=5, eta=0.5, cond="c", seed=1,
                         return_trajectory=True, callback=lambda i, t, x, p: seen.append((i, t)))
    assert len(traj) == 6 and traj[-1] is x0 and x0.dtype == np.float32
    np.testing.assert_array_equal(traj[0], np.random.default_rng(1).standard_normal((3, 2)).astype(np.float32))
    assert seen[0] == (np.int64, (3,), "c") and seen[1::2] == [(i, t) for i, t in enumerate([80, 60, 40, 20, 0])]


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_sample_draw_order_and_noises_argument(sampler, eta):
    """Documented stream: x_T first, then one draw per step that uses noise (ddpm: t > 0; ddim: eta > 0)."""
    s = S.make_schedule(50)
    ts = make_timesteps(50, 10, "trailing")
    rng = np.random.default_rng(7)
    x_T = rng.standard_normal((2, 3))
    uses = [(t > 0) if sampler == "ddpm" else eta > 0 for t in ts]
    noises = [rng.standard_normal((2, 3)) if u else None for u in uses]
    kw = dict(sampler=sampler, eta=eta, num_inference_steps=10, timestep_spacing="trailing", dtype=np.float64)
    a = SM.sample(toy_model, (2, 3), s, seed=7, **kw)
    b = SM.sample(toy_model, (2, 3), s, x_T=x_T, noises=noises, **kw)
    np.testing.assert_array_equal(a, b)
    c = SM.sample(toy_model, (2, 3), s, seed=7, **{**kw, "dtype": np.float32})  # same stream, float32 arithmetic
    np.testing.assert_allclose(c, a, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_names_the_argument():
    s = S.make_schedule(10)
    x = np.zeros((2, 3))
    cases = [
        (lambda: make_timesteps(10, 11), r"num_inference_steps must be in \[1, 10\]"),
        (lambda: make_timesteps(10, 0), r"num_inference_steps must be in \[1, 10\]"),
        (lambda: make_timesteps(10, 5, "uniform"), "timestep_spacing must be one of .*'leading', 'trailing', 'linspace'"),
        (lambda: SM.sample(toy_model, (2, 3), s, num_inference_steps=11), "num_inference_steps must be in"),
        (lambda: SM.sample(toy_model, (2, 3), s, sampler="lms"),
         "sampler must be one of .*'ddpm', 'ddim', 'euler', 'euler_a', 'heun', 'dpm\\+\\+2m'"),
        (lambda: SM.ddpm_step(s, x, 3, 2, x, x, variance_type="small"), "variance_type must be one of .*fixed_small"),
        (lambda: SM.ddpm_step(s, x, 3, 2, x, x, prediction_type="eps"), "prediction_type must be one of"),
        (lambda: SM.ddpm_step(s, x, 10, 2, x, x), r"t must lie in \[0, 10\)"),
        (lambda: SM.ddpm_step(s, x, 3, 3, x, x), "prev_t must be < t"),
        (lambda: SM.ddim_step(s, x, 3, 10, x), r"prev_t must lie in \[-1, 10\)"),
        (lambda: SM.ddpm_step(s, np.zeros((2, 4)), 3, 2, x, x), "shape mismatch"),
        (lambda: SM.ddpm_step(s, x, 3, 2, x, np.zeros((2, 4))), "shape mismatch"),
        (lambda: SM.ddpm_step(s, x, 3, 2, x, None), "noise is required"),
        (lambda: SM.ddim_step(s, x, 3, 2, x, eta=0.5), "noise is required"),
        (lambda: SM.ddim_step(s, x, 3, 2, x, eta=-1.0), "eta must be >= 0"),
        (lambda: SM.ddpm_step(s, x, 3, 2, x, x, variance_type="learned"), "2C = 6 channels"),
        (lambda: SM.sample(toy_model, (2, 3), s, x_T=np.zeros((2, 4))), r"x_T must have shape \(2, 3\)"),
        (lambda: SM.sample(toy_model, (2, 3), s, num_inference_steps=2, noises=[x]), "one entry per step"),
        (lambda: SM.sample(toy_model, (2, 3), s, timesteps=[3, 5]), "strictly descending"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match):
            fn()


@pytest.mark.gpu
def test_numpy_cupy_parity():
    pytest.importorskip("cupy")
    from minidiff.backend import gpu_available, to_numpy
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    s = S.make_schedule(100)
    for sampler, eta in [("ddpm", 0.0), ("ddim", 1.0)]:
        kw = dict(sampler=sampler, eta=eta, num_inference_steps=20, dtype=np.float64, seed=3)
        cpu = SM.sample(toy_model, (2, 3, 4), s, device="cpu", **kw)
        gpu = SM.sample(toy_model, (2, 3, 4), s, device="gpu", **kw)   # same host draws
        np.testing.assert_allclose(to_numpy(gpu), cpu, rtol=1e-12, atol=1e-12)
