"""flat.FlatDict: one buffer behind a dict of arrays, and clipping and the shard sum on it.

The flat path must give the per-tensor path's numbers (Adam, AdamW and the EMA on the buffers, bit for
bit: tests/fast/test_optim.py).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidiff.fast import flat
from minidiff.fast.cpu.shards import Shards
from minidiff.fast.ops import fast_ops
from minidiff.fast.optim import clip_grad_norm as fast_clip_grad_norm
from minidiff.nn.optim import clip_grad_norm
from minidiff.diffusion.schedule import make_schedule
from minidiff.model.unet import init_params
from minidiff.model.config import get_preset
from minidiff.training.trainer import loss_and_grads

shapes = st.lists(st.lists(st.integers(1, 7), min_size=0, max_size=4).map(tuple), min_size=1, max_size=6)


def random_arrays(shape_list, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return {f"p{i}.weight": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shape_list)}


@given(shapes)
def test_flatten_keeps_keys_values_and_aligns_every_view(shape_list):
    arrays = random_arrays(shape_list)
    f = flat.flatten(arrays)
    assert list(f) == list(arrays) and f.intact()
    assert f.buffer.shape == (flat.buffer_size(f.layout),) and f.buffer.shape[0] % flat.ALIGN == 0
    start = f.buffer.__array_interface__["data"][0]
    for k, a in arrays.items():
        assert f[k].shape == a.shape and f[k].dtype == a.dtype and f[k].flags.c_contiguous
        np.testing.assert_array_equal(f[k], a)
        assert (f[k].__array_interface__["data"][0] - start) % (flat.ALIGN * a.itemsize) == 0
    assert float(np.abs(f.buffer).sum()) == pytest.approx(sum(float(np.abs(a).sum()) for a in arrays.values()))


def test_views_write_through_and_reassigning_a_key_cuts_it_loose():
    f = flat.flatten(random_arrays([(3, 2), (5,)]))
    f["p0.weight"][1, 1] = 42.0
    assert f.buffer[3] == 42.0
    assert flat.buffers(f) is not None
    f["p1.weight"] = np.zeros(5)  # a new array: no longer a view of the buffer
    assert not f.intact() and flat.buffers(f) is None


def test_flatten_and_gather_reject_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        flat.flatten({})
    with pytest.raises(ValueError, match="one dtype"):
        flat.flatten({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})
    like = flat.flatten(random_arrays([(3,), (2, 2)]))
    with pytest.raises(ValueError, match="keys and shapes"):
        flat.gather({"p0.weight": np.zeros(3)}, like=like)
    with pytest.raises(ValueError, match="keys and shapes"):
        flat.gather({"p0.weight": np.zeros(3), "p1.weight": np.zeros(4)}, like=like)
    plain = {"a": np.ones(2)}
    assert flat.gather(plain, like=plain) is plain  # nothing flat to gather like


@given(shapes)
def test_gather_copies_into_the_layout_with_zero_gaps(shape_list):
    like = flat.flatten(random_arrays(shape_list, seed=1))
    grads = random_arrays(shape_list, seed=2)
    g = flat.gather(dict(reversed(list(grads.items()))), like=like)  # key order follows like, not grads
    assert g.layout == like.layout and flat.buffers(g, like) is not None
    for k in grads:
        np.testing.assert_array_equal(g[k], grads[k])
    assert np.abs(g.buffer).sum() == pytest.approx(sum(np.abs(a).sum() for a in grads.values()))


@given(shapes, st.floats(1e-3, 10.0))
def test_clip_grad_norm_on_the_flat_buffer_matches_per_tensor(shape_list, max_norm):
    like = flat.flatten(random_arrays(shape_list, 1))
    plain = random_arrays(shape_list, 2)
    g = flat.gather(plain, like=like)
    n_plain, n_flat = clip_grad_norm(plain, max_norm), fast_clip_grad_norm(g, max_norm)  # reference, fast
    assert float(n_flat) == pytest.approx(float(n_plain), rel=1e-13)
    for k in plain:
        np.testing.assert_allclose(g[k], plain[k], rtol=1e-13, atol=0)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_map_batch_returns_one_buffer_equal_to_the_per_key_grads(workers):
    config = get_preset("tiny")
    host = init_params(config, seed=0, dtype=np.float64)
    schedule = make_schedule(100)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((2, 5, 3, 8, 8))
    t = rng.integers(0, 100, 5)
    batch = dict(x0=x0, eps=noise, t=t, class_labels=None, context=None, dropout_masks=None)
    shards = Shards(workers)
    loss_p, g_p = shards.map_batch(loss_and_grads, batch, params=host, config=config, schedule=schedule)
    params = flat.flatten(host)
    loss_f, g_f = shards.map_batch(loss_and_grads, batch, params=params, config=config, schedule=schedule)
    assert isinstance(g_f, flat.FlatDict) and flat.buffers(g_f, params) is not None
    assert float(loss_f) == float(loss_p)
    for k in host:  # the same per-key sums, done on the buffer
        np.testing.assert_array_equal(g_f[k], g_p[k])


def test_the_trainer_keeps_params_moments_and_ema_on_one_buffer_through_steps_and_resume(tmp_path):
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import Trainer

    cfg = dict(out=str(tmp_path / "run"), preset="tiny", steps=4, batch_size=4, save_every=2, sample_every=0,
               log_every=1, warmup_steps=2, lr=1e-3, grad_clip=1.0)
    trainer = Trainer(TrainConfig(**cfg), log=lambda *a, **k: None, ops=fast_ops())  # FAST: flat buffers
    for _ in range(2):
        trainer.train_step()
    trainer.flush_losses()
    trainer.save()
    state = (trainer.params, trainer.opt.exp_avg, trainer.opt.exp_avg_sq, trainer.ema.shadow)
    assert flat.buffers(*state) is not None  # the one-buffer update ran, no key was cut loose
    trainer.close()  # the run folder's lock: one writer at a time (issue 17)
    resumed = Trainer(TrainConfig(**cfg | {"resume": True}), log=lambda *a, **k: None, ops=fast_ops())
    again = (resumed.params, resumed.opt.exp_avg, resumed.opt.exp_avg_sq, resumed.ema.shadow)
    assert flat.buffers(*again) is not None
    for a, b in zip(state, again):
        np.testing.assert_array_equal(a.buffer, b.buffer)
