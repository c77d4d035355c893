"""Data parallelism (minidiff/fast/cpu/shards.py): a batch split into shards run in threads gives the
unsplit step's loss, gradients, dropout masks and rng state, up to float rounding."""

import dataclasses

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minidiff.diffusion.loss import diffusion_loss
from minidiff.nn.dropout import dropout_mask
from minidiff.fast.cpu.shards import forward, loss_and_grads, resolve_workers, shard_bounds
from minidiff.diffusion.schedule import add_noise, make_schedule
from minidiff.train.trainer import Trainer
from minidiff.train.config import TrainConfig
from minidiff.model.unet import init_params, unet_backward, unet_forward
from minidiff.model.config import get_preset

SCHEDULE = make_schedule(1000, "linear")


@given(n=st.integers(1, 300), workers=st.integers(1, 16))
@example(n=1, workers=4)  # fewer rows than workers: one shard per row
@example(n=7, workers=2)  # uneven split
def test_shard_bounds_cover_the_batch_in_order(n, workers):
    bounds = shard_bounds(n, workers)
    assert len(bounds) == min(n, workers)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
    sizes = [stop - start for start, stop in bounds]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


def test_dropout_mask_rows_are_the_rows_of_the_whole_mask():
    whole = dropout_mask(123, (7, 3, 4), 0.4)
    parts = [dropout_mask(123, (7, 3, 4), 0.4, rows) for rows in shard_bounds(7, 3)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert 0.3 < 1 - whole.mean() < 0.5  # P(drop) = 0.4, roughly


def _setup(conditioning, dropout, n=5, seed=1):
    base = get_preset("tiny")
    changes = {"dropout": dropout}
    if conditioning == "class":
        changes["num_class_embeds"] = 4
    if conditioning == "text":
        changes.update(cross_attention_dim=8, context_vocab_size=6)
    config = dataclasses.replace(base, **changes)
    params = init_params(config, seed=0, dtype=np.float64)
    r = np.random.default_rng(seed)
    x0, noise = r.standard_normal((2, n, 3, 8, 8))
    t = r.integers(0, 1000, n)
    cond = {}
    if conditioning == "class":
        cond["class_labels"] = r.integers(0, 4, n)
    if conditioning == "text":
        ids = r.integers(0, 6, (n, 3))
        ids[0] = 0  # one empty prompt
        cond["context"] = ids
    return config, params, add_noise(SCHEDULE, x0, noise, t), x0, noise, t, cond


def _max_rel_error(want: dict, got: dict) -> float:
    """max_k |want_k - got_k| / max|want| over all grads: the key bias of attention has a true gradient
    of exactly 0 (softmax ignores a shift shared by all keys), so it is compared on the global scale."""
    scale = max(float(np.abs(g).max()) for g in want.values())
    return max(float(np.abs(want[k] - got[k]).max()) for k in want) / scale


@pytest.mark.parametrize("conditioning,dropout", [("none", 0.0), ("class", 0.3), ("text", 0.3)])
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_sharded_step_equals_the_unsplit_step(conditioning, dropout, workers):
    config, params, x_t, x0, noise, t, cond = _setup(conditioning, dropout)
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    out, cache = unet_forward(params, config, x_t, t, train=True, rng=rng_a, **cond)
    want_loss, dout = diffusion_loss(SCHEDULE, out, x0, noise, t)
    want, _ = unet_backward(dout, cache)
    loss, grads = loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, rng=rng_b, workers=workers, **cond)
    assert sorted(grads) == sorted(want)
    if workers == 1:  # op for op the same computation
        assert float(loss) == float(want_loss)
        assert all(np.array_equal(grads[k], want[k]) for k in want)
    assert abs(float(loss) - float(want_loss)) <= 1e-14 * float(want_loss)
    assert _max_rel_error(want, grads) < 1e-13
    assert rng_b.bit_generator.state == rng_a.bit_generator.state  # as many dropout seeds drawn


def test_sharded_dropout_changes_the_result_and_matches_the_unsplit_masks():
    """Guard against a vacuous test above: with dropout the shards must use the whole batch's masks."""
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.5)
    out, cache = unet_forward(params, config, x_t, t, train=True, rng=np.random.default_rng(9))
    want, _ = unet_backward(diffusion_loss(SCHEDULE, out, x0, noise, t)[1], cache)
    _, other = loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, rng=np.random.default_rng(10), workers=2)
    _, same = loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, rng=np.random.default_rng(9), workers=2)
    assert _max_rel_error(want, other) > 1e-3  # other masks, other gradients
    assert _max_rel_error(want, same) < 1e-13


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_sharded_forward_equals_unet_forward(workers):
    """parallel.forward runs unet_forward(for_backward=False): the same numbers, no cache kept."""
    config, params, x_t, _, _, t, cond = _setup("text", 0.0, n=6)
    want, _ = unet_forward(params, config, x_t, t, **cond)
    np.testing.assert_allclose(forward(params, config, x_t, t, workers=workers, **cond), want, rtol=0, atol=1e-13)
    assert unet_forward(params, config, x_t, t, for_backward=False, **cond)[1] is None
    want, _ = unet_forward(params, config, x_t, 300, **cond)  # one scalar t for the batch
    np.testing.assert_allclose(forward(params, config, x_t, 300, workers=workers, **cond), want, rtol=0, atol=1e-13)


def test_training_with_one_or_two_threads_gives_the_same_losses(tmp_path):
    kw = dict(preset="tiny", steps=3, batch_size=5, save_every=3, sample_every=0, log_every=1, warmup_steps=1,
              dtype="float64", dropout=0.1, conditioning="text")
    one = Trainer(TrainConfig(out=str(tmp_path / "one"), threads=1, **kw), log=lambda *a: None)
    two = Trainer(TrainConfig(out=str(tmp_path / "two"), threads=2, **kw), log=lambda *a: None)
    assert one.workers == 1 and two.workers == 2
    for _ in range(3):
        one.train_step(), two.train_step()
    a, b = one.flush_losses(), two.flush_losses()
    assert one.losses == pytest.approx(two.losses, rel=1e-12) and a == pytest.approx(b, rel=1e-12)
    assert _max_rel_error(one.params, two.params) < 1e-12


def test_workers_bad_input_and_auto():
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="workers"):
            resolve_workers(bad)
    assert 1 <= resolve_workers(0) <= 4
    assert resolve_workers(3) == 3 and resolve_workers(3, "gpu") == 1
