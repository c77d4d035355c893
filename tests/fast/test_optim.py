"""fast/optim.py against nn/optim.py: Adam/AdamW and the EMA over whole flat buffers give the
per-tensor reference numbers bit for bit (elementwise rules, the same operations in the same order,
and the buffers' zero gaps stay zero), on NumPy and on the fake CuPy (one kernel per update).
"""

import numpy as np
import pytest

import fake_cupy
from minidiff.backend import to_device, to_numpy
from minidiff.fast import flat
from minidiff.fast import optim as fast
from minidiff.fast.ops import FAST
from minidiff.nn import optim as reference
from minidiff.nn.ops import REFERENCE
from minidiff.training.optim import EMA, Adam, AdamW

SHAPES = [(4, 3, 3, 3), (4,), (7, 5), (1,), (65,)]  # 65: a tensor past one ALIGN block
RULES = {  # name -> adam_update's keyword arguments
    "adam": dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False),
    "adam_l2": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1, decoupled=False),
    "adamw": dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, decoupled=True),
}


@pytest.fixture
def fake(monkeypatch):
    return fake_cupy.install(monkeypatch)


def random_arrays(seed=0, dtype=np.float64, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {f"p{i}.weight": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}


def zeros(arrays):
    return {k: np.zeros_like(a) for k, a in arrays.items()}


def gaps(f: flat.FlatDict) -> np.ndarray:
    """True at the entries of f.buffer that no view covers (the alignment gaps)."""
    out, offset = np.ones(f.buffer.shape, bool), 0
    for _, shape in f.layout:
        n = int(np.prod(shape))
        out[offset:offset + n] = False
        offset += -(-n // flat.ALIGN) * flat.ALIGN
    return out


def test_the_table_holds_the_fast_updates():
    assert FAST.adam_update is fast.adam_update and FAST.ema_update is fast.ema_update
    assert FAST.arrange_params is flat.flatten


@pytest.mark.parametrize("piece", [flat.PIECE, 64])  # 64: the NumPy update runs in many pieces
@pytest.mark.parametrize("gather", [False, True])  # grads as a plain dict: gathered into a buffer first
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_adam_on_flat_buffers_is_bit_for_bit_the_per_tensor_rule(monkeypatch, rule, dtype, gather, piece):
    monkeypatch.setattr(flat, "PIECE", piece)
    p_ref = random_arrays(0, dtype)
    m_ref, v_ref = zeros(p_ref), zeros(p_ref)
    p, m, v = flat.flatten(p_ref), flat.flatten(m_ref), flat.flatten(v_ref)
    for step in range(1, 5):
        grads = random_arrays(10 + step, dtype)
        reference.adam_update(p_ref, grads, m_ref, v_ref, step=step, **RULES[rule])
        g = dict(grads) if gather else flat.gather(grads, like=p)
        fast.adam_update(p, g, m, v, step=step, **RULES[rule])
    assert flat.buffers(p, m, v) is not None  # updated in place, views intact
    for k in p_ref:
        for got, want in ((p, p_ref), (m, m_ref), (v, v_ref)):
            assert got[k].dtype == dtype
            np.testing.assert_array_equal(got[k], want[k])
    for f in (p, m, v):
        assert not f.buffer[gaps(f)].any()  # the gaps stay exactly zero


def test_adam_with_eps_zero_stays_per_tensor():
    """A gap's update would be 0 / (sqrt(0) + 0): eps = 0 runs tensor by tensor, with no 0 / 0."""
    p_ref = random_arrays(0)
    m_ref, v_ref = zeros(p_ref), zeros(p_ref)
    p, m, v = flat.flatten(p_ref), flat.flatten(m_ref), flat.flatten(v_ref)
    kw = dict(RULES["adam"], eps=0.0)
    grads = random_arrays(3)
    reference.adam_update(p_ref, grads, m_ref, v_ref, step=1, **kw)
    with np.errstate(invalid="raise", divide="raise"):
        fast.adam_update(p, grads, m, v, step=1, **kw)
    assert np.isfinite(p.buffer).all()
    for k in p_ref:
        np.testing.assert_array_equal(p[k], p_ref[k])


def test_dicts_not_all_flat_fall_back_to_the_reference_rule():
    p_ref = random_arrays(0)
    m_ref, v_ref = zeros(p_ref), zeros(p_ref)
    p, m, v = dict(p_ref), flat.flatten(m_ref), flat.flatten(v_ref)  # plain params, flat state
    p = {k: a.copy() for k, a in p.items()}
    grads = random_arrays(5)
    reference.adam_update(p_ref, grads, m_ref, v_ref, step=1, **RULES["adamw"])
    fast.adam_update(p, grads, m, v, step=1, **RULES["adamw"])
    for k in p_ref:
        np.testing.assert_array_equal(p[k], p_ref[k])
        np.testing.assert_array_equal(v[k], v_ref[k])


@pytest.mark.parametrize("flat_params", [True, False])
def test_ema_on_flat_buffers_is_bit_for_bit_the_per_tensor_rule(flat_params):
    e_ref = random_arrays(0, np.float32)
    e = flat.flatten(e_ref)
    for step in range(5):
        params = random_arrays(20 + step, np.float32)
        reference.ema_update(e_ref, params, 0.9 + 0.01 * step)
        fast.ema_update(e, flat.flatten(params) if flat_params else params, 0.9 + 0.01 * step)
    assert flat.buffers(e) is not None and not e.buffer[gaps(e)].any()
    for k in e_ref:
        np.testing.assert_array_equal(e[k], e_ref[k])


@pytest.mark.parametrize("make", [lambda p, ops: Adam(p, lr=1e-2, weight_decay=0.1, ops=ops),
                                  lambda p, ops: AdamW(p, lr=1e-2, weight_decay=0.1, ops=ops),
                                  lambda p, ops: Adam(p, lr=1e-2, ops=ops)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_optimizer_with_fast_holds_its_state_in_flat_buffers(make, dtype):
    """training/optim.py with ops=FAST: the state arranged like the params (one buffer each), the same
    numbers as with the reference table, and a state_dict that loads into a per-tensor optimizer."""
    plain = random_arrays(0, dtype)
    flat_p = FAST.arrange_params(plain)
    opt_plain, opt_flat = make(plain, REFERENCE), make(flat_p, FAST)
    assert flat.buffers(flat_p, opt_flat.exp_avg, opt_flat.exp_avg_sq) is not None
    ema_plain, ema_flat = EMA(plain, 0.99), EMA(flat_p, 0.99, ops=FAST)
    assert flat.buffers(flat_p, ema_flat.shadow) is not None
    for step in range(4):
        grads = random_arrays(10 + step, dtype)
        opt_plain.step(plain, grads, lr=1e-2 * (step + 1))
        opt_flat.step(flat_p, dict(grads), lr=1e-2 * (step + 1))  # gathered by fast.adam_update
        assert ema_plain.update(plain) == ema_flat.update(flat_p)
    for k in plain:
        np.testing.assert_array_equal(flat_p[k], plain[k])
        np.testing.assert_array_equal(opt_flat.exp_avg_sq[k], opt_plain.exp_avg_sq[k])
        np.testing.assert_array_equal(ema_flat.shadow[k], ema_plain.shadow[k])
    assert not flat_p.buffer[gaps(flat_p)].any() and not opt_flat.exp_avg.buffer[gaps(flat_p)].any()
    other = make(random_arrays(5, dtype), REFERENCE)  # a per-tensor optimizer
    other.load_state_dict(opt_flat.state_dict())
    for k in plain:
        np.testing.assert_array_equal(other.exp_avg[k], opt_plain.exp_avg[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", sorted(RULES))
def test_on_cupy_one_kernel_per_update_bit_for_bit(fake, rule, dtype):
    """On the device the flat buffers take one kernel per update (fast/cuda/optim.py, emulated line for
    line by the fake), with the NumPy reference's numbers; plain dicts take one kernel per tensor."""
    for as_flat in (True, False):
        p_ref = random_arrays(0, dtype)
        m_ref, v_ref, e_ref = zeros(p_ref), zeros(p_ref), {k: a.copy() for k, a in p_ref.items()}
        arrange = flat.flatten if as_flat else (lambda d: d)
        p, m, v, e = (arrange(to_device(d, "gpu")) for d in (p_ref, m_ref, v_ref, e_ref))
        for step in range(1, 4):
            grads = random_arrays(10 + step, dtype)
            reference.adam_update(p_ref, grads, m_ref, v_ref, step=step, **RULES[rule])
            reference.ema_update(e_ref, p_ref, 0.9)
            g = to_device(grads, "gpu")
            g = flat.gather(g, like=p) if as_flat and step < 3 else g  # at step 3 fast.adam_update gathers
            fake.kernels_called.clear()
            ops = fake_cupy.count(lambda: fast.adam_update(p, g, m, v, step=step, **RULES[rule]))["ops"]
            ops += fake_cupy.count(lambda: fast.ema_update(e, p, 0.9))["ops"]
            n = 1 if as_flat else len(SHAPES)
            assert fake.kernels_called == ["minidiff_adam_update"] * n + ["minidiff_ema_update"] * n
            if step < 3:
                assert ops == 2 * n  # one device operation per update
        for got, want in ((p, p_ref), (m, m_ref), (v, v_ref), (e, e_ref)):
            for k in p_ref:
                np.testing.assert_array_equal(to_numpy(got[k]), want[k])
