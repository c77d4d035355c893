"""Adam/AdamW, warm-up, clipping and EMA against PyTorch (and diffusers' EMAModel) in float64."""

import numpy as np
import pytest

from minidiff.nn.optim import clip_grad_norm
from minidiff.training.optim import EMA, Adam, AdamW, warmup_lr
from gradcheck import rel_error

SHAPES = {"conv.weight": (4, 3, 3, 3), "conv.bias": (4,), "linear.weight": (5, 7)}


def make_params(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) for k, s in SHAPES.items()}


def grad_seq(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s) * (0.1 + i) for k, s in SHAPES.items()} for i in range(steps)]


@pytest.mark.parametrize("cls, kwargs", [
    ("Adam", {}),
    ("Adam", {"weight_decay": 0.1, "betas": (0.8, 0.99), "eps": 1e-3}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.3, "betas": (0.5, 0.9)}),
])
def test_adam_matches_torch(cls, kwargs):
    torch = pytest.importorskip("torch")
    params = make_params()
    tparams = [torch.nn.Parameter(torch.tensor(p.copy(), dtype=torch.float64)) for p in params.values()]
    opt = {"Adam": Adam, "AdamW": AdamW}[cls](params, lr=1e-2, **kwargs)
    topt = getattr(torch.optim, cls)(tparams, lr=1e-2, **kwargs)
    for i, grads in enumerate(grad_seq(6)):
        lr = warmup_lr(i, 1e-2, 4)  # lr changes every step during warm-up
        for tp, g in zip(tparams, grads.values()):
            tp.grad = torch.tensor(g, dtype=torch.float64)
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()
        opt.step(params, grads, lr=lr)
        for (k, p), tp in zip(params.items(), tparams):
            assert rel_error(p, tp.detach().numpy()) < 1e-10, (i, k)
    assert opt.step_count == 6


def test_adam_first_step_by_hand():
    # t = 1: m_hat = g, v_hat = g^2, so p1 = p0 - lr g / (|g| + eps)
    p = {"w": np.array([1.0, -2.0, 3.0])}
    g = {"w": np.array([0.5, -4.0, 0.0])}
    Adam(p, lr=0.1, eps=1e-8).step(p, g)
    np.testing.assert_allclose(p["w"], [1.0 - 0.1 * 0.5 / (0.5 + 1e-8), -2.0 + 0.1 * 4 / (4 + 1e-8), 3.0], rtol=1e-14)


@pytest.mark.parametrize("cls", [Adam, AdamW])
def test_state_dict_resume_is_exact(cls):
    grads = grad_seq(6)
    p_full = make_params()
    opt = cls(p_full, lr=3e-3)
    for g in grads:
        opt.step(p_full, g)
    p_half = make_params()
    opt_a = cls(p_half, lr=3e-3)
    for g in grads[:3]:
        opt_a.step(p_half, g)
    state = opt_a.state_dict()
    opt_b = cls(p_half, lr=3e-3)  # a fresh optimizer, as after a restart
    opt_b.load_state_dict(state)
    for g in grads[3:]:
        opt_b.step(p_half, g)
    for k in p_full:
        np.testing.assert_array_equal(p_full[k], p_half[k])


def test_float32_stays_float32_and_bad_input():
    p = {k: v.astype(np.float32) for k, v in make_params().items()}
    opt = AdamW(p)
    opt.step(p, {k: np.ones_like(v) for k, v in p.items()})
    assert all(v.dtype == np.float32 for v in p.values())
    assert all(v.dtype == np.float32 for v in opt.state_dict()["exp_avg"].values())
    with pytest.raises(ValueError, match="missing .'conv.bias'."):
        opt.step(p, {k: v for k, v in p.items() if k != "conv.bias"})
    with pytest.raises(ValueError, match=r"grads\['conv.bias'\] has shape"):
        opt.step(p, {**p, "conv.bias": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="betas"):
        Adam(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        Adam(p, lr=-1)
    bad = opt.state_dict()
    bad["hparams"]["weight_decay"] = 0.5
    with pytest.raises(ValueError, match="weight_decay=0.5"):
        opt.load_state_dict(bad)


def test_warmup_lr():
    assert [warmup_lr(s, 1.0, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_lr(0, 2e-4, 0) == 2e-4
    with pytest.raises(ValueError, match="step"):
        warmup_lr(-1, 1.0, 4)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_lr(0, 1.0, 1.5)


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])
def test_clip_grad_norm_matches_torch(max_norm):
    torch = pytest.importorskip("torch")
    grads = grad_seq(1, seed=7)[0]
    tparams = [torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.float64)) for g in grads.values()]
    for tp, g in zip(tparams, grads.values()):
        tp.grad = torch.tensor(g, dtype=torch.float64)
    want_norm = torch.nn.utils.clip_grad_norm_(tparams, max_norm).item()
    norm = clip_grad_norm(grads, max_norm)
    assert abs(norm - want_norm) <= 1e-10 * want_norm
    for g, tp in zip(grads.values(), tparams):
        assert rel_error(g, tp.grad.numpy()) < 1e-10
    total = np.sqrt(sum((g**2).sum() for g in grads.values()))
    assert total == pytest.approx(min(norm, max_norm), rel=1e-6)  # after clipping: <= max_norm


def test_clip_nonfinite_and_bad_input():
    g = {"a": np.array([np.nan, 1.0]), "b": np.array([2.0])}
    assert np.isnan(clip_grad_norm(g, 1.0)) and np.isnan(g["b"]).all()
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm({"a": np.ones(2)}, 0.0)
    assert clip_grad_norm({}, 1.0) == 0.0


def test_ema_decay_schedule_and_update():
    p = {"w": np.zeros(3)}
    ema = EMA(p, decay=0.9, warmup=True)
    assert [ema.decay_at(n) for n in (1, 2, 3, 30, 100)] == [0.0, 2 / 11, 3 / 12, 30 / 39, 0.9]
    p["w"][:] = 1.0
    ema.update(p)  # decay 0: the average jumps to p
    np.testing.assert_array_equal(ema.shadow["w"], 1.0)
    plain = EMA({"w": np.zeros(3)}, decay=0.9, warmup=False)
    plain.update(p)
    np.testing.assert_allclose(plain.shadow["w"], 0.1, rtol=1e-15)  # 0.9 * 0 + 0.1 * 1
    state = ema.state_dict()
    other = EMA({"w": np.zeros(3)}, decay=0.9)
    other.load_state_dict(state)
    assert other.num_updates == 1 and np.array_equal(other.shadow["w"], ema.shadow["w"])
    with pytest.raises(ValueError, match="decay"):
        EMA(p, decay=1.5)


def test_ema_matches_diffusers():
    torch = pytest.importorskip("torch")
    training_utils = pytest.importorskip("diffusers.training_utils")
    params = make_params()
    tparams = [torch.nn.Parameter(torch.tensor(p.copy(), dtype=torch.float64)) for p in params.values()]
    ref = training_utils.EMAModel(tparams, decay=0.95)
    ema = EMA(params, decay=0.95, warmup=True)
    for grads in grad_seq(40):
        for (k, p), tp in zip(params.items(), tparams):
            p -= 0.1 * grads[k]  # the weights move
            with torch.no_grad():
                tp.copy_(torch.tensor(p))
        ref.step(tparams)
        ema.update(params)
    for s, ts in zip(ema.shadow.values(), ref.shadow_params):
        assert rel_error(s, ts.numpy()) < 1e-10


def test_adam_and_ema_run_the_rules_of_the_table_they_are_given():
    """The classes hold the state and call ops.adam_update / ops.ema_update with it (any object with those
    fields and arrange_params); the default table is REFERENCE, nn/optim.py's rules."""
    import dataclasses

    from minidiff.nn import optim as rules
    from minidiff.nn.ops import REFERENCE

    calls = []

    def adam_update(params, grads, exp_avg, exp_avg_sq, **kw):
        calls.append(("adam", exp_avg, exp_avg_sq, kw))
        rules.adam_update(params, grads, exp_avg, exp_avg_sq, **kw)

    def ema_update(shadow, params, decay):
        calls.append(("ema", shadow, decay))
        rules.ema_update(shadow, params, decay)

    ops = dataclasses.replace(REFERENCE, adam_update=adam_update, ema_update=ema_update,
                              arrange_params=lambda d: dict(reversed(list(d.items()))))
    params, grads = make_params(), grad_seq(2)
    opt, ema = AdamW(params, lr=1e-2, ops=ops), EMA(params, 0.9, warmup=False, ops=ops)
    assert list(opt.exp_avg) == list(reversed(SHAPES)) == list(ema.shadow)  # arranged by the table
    for g in grads:
        opt.step(params, g, lr=5e-3)
        ema.update(params)
    assert [c[0] for c in calls] == ["adam", "ema", "adam", "ema"]
    assert calls[2][1] is opt.exp_avg and calls[2][2] is opt.exp_avg_sq and calls[3][1] is ema.shadow
    assert calls[2][3] == dict(lr=5e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, decoupled=True, step=2)
    assert calls[3][2] == 0.9
    ref_params = make_params()
    ref_opt = AdamW(ref_params, lr=1e-2)
    assert ref_opt.ops is REFERENCE and EMA(ref_params).ops is REFERENCE
    for g in grads:
        ref_opt.step(ref_params, g, lr=5e-3)
    for k in params:
        np.testing.assert_array_equal(params[k], ref_params[k])
