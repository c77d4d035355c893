"""The training objective, its gradient, min-SNR-gamma weights, timestep sampling and condition dropout."""

import numpy as np
import pytest
from gradcheck import check_grads
from hypothesis import example, given, settings
from hypothesis import strategies as st

from minidiff.diffusion import loss as L
from minidiff.diffusion import schedule as S

SCHED = S.make_schedule()
ZSNR = S.make_schedule(rescale_betas_zero_snr=True)
PTYPES = list(S.PREDICTION_TYPES)


def batch(seed, shape=(4, 2, 3, 3)):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(shape), rng.standard_normal(shape), rng.standard_normal(shape), \
        rng.integers(0, 1000, shape[0])


def test_targets_by_hand():
    out, x0, eps, t = batch(0)
    a = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t][:, None, None, None]
    targets = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(a) * eps - np.sqrt(1 - a) * x0}
    for ptype, target in targets.items():
        loss, dout = L.diffusion_loss(SCHED, out, x0, eps, t, ptype)
        assert loss.shape == () and loss == pytest.approx(np.mean((out - target) ** 2), rel=1e-12)
        np.testing.assert_allclose(dout, 2 * (out - target) / out.size, rtol=1e-12)


def test_min_snr_weights_by_hand():
    t = np.array([0, 10, 300, 999])
    snr = SCHED.alphas_cumprod[t] / (1 - SCHED.alphas_cumprod[t])
    g = 5.0
    np.testing.assert_allclose(L.min_snr_weights(SCHED, t, "epsilon", g), np.minimum(snr, g) / snr, rtol=1e-14)
    np.testing.assert_allclose(L.min_snr_weights(SCHED, t, "sample", g), np.minimum(snr, g), rtol=1e-14)
    np.testing.assert_allclose(L.min_snr_weights(SCHED, t, "v_prediction", g), np.minimum(snr, g) / (snr + 1), rtol=1e-14)
    assert L.min_snr_weights(SCHED, t, "epsilon", g)[0] == pytest.approx(g / snr[0])   # high SNR is down-weighted
    assert np.all(L.min_snr_weights(SCHED, t, "epsilon", None) == 1)
    assert np.all(L.min_snr_weights(SCHED, t, "epsilon", 0) == 1)                       # TrainConfig's "0 = off"
    # zero terminal SNR: epsilon's weight min(snr, g)/snr -> 1 as snr -> 0 (not 0/0); v and x0 weights -> 0
    assert L.min_snr_weights(ZSNR, 999, "epsilon", g) == 1.0
    assert L.min_snr_weights(ZSNR, 999, "v_prediction", g) == 0.0


def test_weighted_loss_is_mean_of_per_item_weighted_mse():
    out, x0, eps, t = batch(1)
    w = L.min_snr_weights(SCHED, t, "v_prediction", 5.0)
    target = S.get_velocity(SCHED, x0, eps, t)
    per_item = ((out - target) ** 2).mean(axis=(1, 2, 3))      # diffusers: loss.mean(non-batch dims) * w, then .mean()
    loss, _ = L.diffusion_loss(SCHED, out, x0, eps, t, "v_prediction", snr_gamma=5.0)
    assert loss == pytest.approx(np.mean(per_item * w), rel=1e-12)


@settings(max_examples=10)
@given(st.sampled_from(PTYPES), st.sampled_from([None, 1.0, 5.0]), st.integers(0, 10**6), st.booleans())
def test_gradient_matches_finite_differences(ptype, gamma, seed, one_t):
    out, x0, eps, t = batch(seed, (3, 2, 2, 2))
    t = int(t[0]) if one_t else t
    check_grads(lambda out: L.diffusion_loss(SCHED, out, x0, eps, t, ptype, gamma)[0],
                {"out": out}, lambda g: {"out": g * L.diffusion_loss(SCHED, out, x0, eps, t, ptype, gamma)[1]})


def test_float32_in_float32_out():
    out, x0, eps, t = (a.astype(np.float32) if a.dtype == np.float64 else a for a in batch(2))
    loss, dout = L.diffusion_loss(SCHED, out, x0, eps, t, "v_prediction", 5.0)
    assert loss.dtype == np.float32 and dout.dtype == np.float32


def test_matches_diffusers_training_formula():
    """diffusers' train_text_to_image min-SNR branch, written with its compute_snr and F.mse_loss."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr
    ref = diffusers.DDPMScheduler(prediction_type="epsilon")
    ref.alphas_cumprod = torch.from_numpy(SCHED.alphas_cumprod.copy())
    out, x0, eps, t = batch(3)
    tt = torch.from_numpy(t)
    snr = compute_snr(ref, tt).double()
    w = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0] / snr
    o = torch.from_numpy(out).requires_grad_()
    ref_loss = (torch.nn.functional.mse_loss(o, torch.from_numpy(eps), reduction="none").mean(dim=[1, 2, 3]) * w).mean()
    ref_loss.backward()
    loss, dout = L.diffusion_loss(SCHED, out, x0, eps, t, "epsilon", 5.0)
    assert float(loss) == pytest.approx(ref_loss.item(), rel=1e-6)         # compute_snr rounds to float32
    np.testing.assert_allclose(dout, o.grad.numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- sampling helpers


def test_sample_timesteps_uniform_and_seeded():
    """n = 100000 draws over T = 10: each count is Binomial(n, 1/10), std sqrt(n 0.1 0.9) = 95; allow 4 of those."""
    t = L.sample_timesteps(np.random.default_rng(0), 100000, 10)
    assert t.dtype == np.int64 and t.min() == 0 and t.max() == 9
    assert np.all(np.abs(np.bincount(t, minlength=10) - 10000) < 4 * np.sqrt(100000 * 0.09))
    np.testing.assert_array_equal(t[:5], L.sample_timesteps(np.random.default_rng(0), 5, 10))


@given(st.floats(0, 1), st.integers(0, 10**6))
@example(p=5e-324, seed=0)  # found by the dev profile: sqrt(p (1 - p) / n) underflows to 0
def test_drop_condition(p, seed):
    """The dropped fraction of n = 2000 items is within 4 sqrt(p (1 - p) / n) of p, plus 1 / n for the
    fraction's granularity (one item)."""
    n = 2000
    labels = np.random.default_rng(seed).integers(0, 10, n)
    before = labels.copy()
    dropped, out = L.drop_condition(np.random.default_rng(seed), labels, 10, p_uncond=p)
    assert dropped.dtype == np.bool_ and dropped.shape == (n,)
    np.testing.assert_array_equal(labels, before)                           # input not mutated
    np.testing.assert_array_equal(out[dropped], 10)
    np.testing.assert_array_equal(out[~dropped], labels[~dropped])
    assert abs(dropped.mean() - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1 / n
    np.testing.assert_array_equal(dropped, np.random.default_rng(seed).random(n) < p)   # the documented draw


def test_drop_condition_embeddings_and_default_p():
    emb, null = np.ones((500, 4, 8)), np.zeros((4, 8))
    dropped, out = L.drop_condition(np.random.default_rng(1), emb, null)
    np.testing.assert_array_equal(out[dropped], 0.0)
    np.testing.assert_array_equal(out[~dropped], 1.0)
    assert 0.1 - 4 * np.sqrt(0.09 / 500) < dropped.mean() < 0.1 + 4 * np.sqrt(0.09 / 500)   # default p_uncond = 0.1


def test_loss_bad_input():
    out, x0, eps, t = batch(4)
    with pytest.raises(ValueError, match="shape mismatch"):
        L.diffusion_loss(SCHED, out[:, :1], x0, eps, t)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        L.diffusion_loss(SCHED, out, x0, eps, t, "x0")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\)"):
        L.diffusion_loss(SCHED, out, x0, eps, t + 1000)
    with pytest.raises(ValueError, match="snr_gamma must be > 0"):
        L.diffusion_loss(SCHED, out, x0, eps, t, snr_gamma=-1.0)
    with pytest.raises(ValueError, match="rng must be a np.random.Generator"):
        L.sample_timesteps(0, 4, 10)
    with pytest.raises(ValueError, match=r"p_uncond must be in \[0, 1\]"):
        L.drop_condition(np.random.default_rng(0), np.zeros(3), 0, p_uncond=1.5)
    with pytest.raises(ValueError, match=r"null_cond must be a scalar or have shape cond.shape\[1:\]"):
        L.drop_condition(np.random.default_rng(0), np.zeros((3, 4)), np.zeros(5))
