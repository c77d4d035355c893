"""Data parallelism (minidiff/fast/cpu/shards.py, shard_processes.py, shard_messages.py): a batch split
into shards gives the unsplit batch's loss, gradients and outputs up to float rounding; the shards in
worker processes give the threads' numbers bit for bit; errors come back; nothing is pickled."""

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minidiff.diffusion.loss import diffusion_loss
from minidiff.diffusion.schedule import add_noise, make_schedule
from minidiff.fast import flat
from minidiff.fast.cpu import shard_messages, shard_processes
from minidiff.fast.cpu.shard_messages import decode, encode, pack, unpack
from minidiff.fast.cpu.shards import Shards, resolve_workers, shard_bounds
from minidiff.fast.ops import FAST, fast_ops
from minidiff.model.config import get_preset
from minidiff.model.dropout import draw_dropout_masks
from minidiff.model.unet import init_params, unet_backward, unet_forward
from minidiff.nn.dropout import dropout_mask
from minidiff.nn.ops import REFERENCE
from minidiff.training.bundle import model_output
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import Trainer, loss_and_grads

SCHEDULE = make_schedule(1000, "linear")


def step(params, config, x0, noise, t, cond, masks=None, workers=1, shards="threads", ops=REFERENCE):
    """Shards(workers, shards).map_batch(loss_and_grads, ...): (loss, grads) of the batch, as Trainer.train_step."""
    batch = dict(x0=x0, eps=noise, t=t, class_labels=cond.get("class_labels"), context=cond.get("context"),
                 dropout_masks=masks)
    return Shards(workers, shards).map_batch(loss_and_grads, batch, params=params, config=config, schedule=SCHEDULE,
                                             ops=ops)


def forward(params, config, x, t, workers=1, shards="threads", class_labels=None, context=None, ops=REFERENCE):
    """Shards(workers, shards).map_forward(model_output, ...): eps (N, C, H, W), as Bundle.model_fn."""
    batch = dict(x=x, t=t, class_labels=class_labels, context=context)
    return Shards(workers, shards).map_forward(model_output, batch, params=params, config=config, ops=ops)


def masks_of(config, seed, shape):
    """The dropout masks of one step (None without dropout), drawn as the Trainer draws them."""
    return draw_dropout_masks(config, np.random.default_rng(seed), shape) if config.dropout > 0 else None


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
    masks = masks_of(config, 5, x0.shape)
    out, cache = unet_forward(params, config, x_t, t, train=True, dropout_masks=masks, **cond)
    want_loss, dout = diffusion_loss(SCHEDULE, out, x0, noise, t)
    want, _ = unet_backward(dout, cache)
    loss, grads = step(params, config, x0, noise, t, cond, masks, workers=workers)
    assert sorted(grads) == sorted(want)
    if workers == 1:  # op for op the same computation
        assert float(loss) == float(want_loss)
        assert all(np.array_equal(grads[k], want[k]) for k in want)
    assert abs(float(loss) - float(want_loss)) <= 1e-14 * float(want_loss)
    assert _max_rel_error(want, grads) < 1e-13


def test_sharded_dropout_changes_the_result_and_matches_the_unsplit_masks():
    """Guard against a vacuous test above: with dropout the shards must use the whole batch's masks."""
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.5)
    masks = masks_of(config, 9, x0.shape)
    out, cache = unet_forward(params, config, x_t, t, train=True, dropout_masks=masks)
    want, _ = unet_backward(diffusion_loss(SCHEDULE, out, x0, noise, t)[1], cache)
    _, other = step(params, config, x0, noise, t, {}, masks_of(config, 10, x0.shape), workers=2)
    _, same = step(params, config, x0, noise, t, {}, masks, workers=2)
    assert _max_rel_error(want, other) > 1e-3  # other masks, other gradients
    assert _max_rel_error(want, same) < 1e-13


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_sharded_forward_equals_unet_forward(workers):
    """map_forward(model_output) runs unet_forward(for_backward=False): the same numbers, no cache kept."""
    config, params, x_t, _, _, t, cond = _setup("text", 0.0, n=6)
    want, _ = unet_forward(params, config, x_t, t, **cond)
    np.testing.assert_allclose(forward(params, config, x_t, t, workers=workers, **cond), want, rtol=0, atol=1e-13)
    assert unet_forward(params, config, x_t, t, for_backward=False, **cond)[1] is None
    want, _ = unet_forward(params, config, x_t, 300, **cond)  # one scalar t for the batch
    np.testing.assert_allclose(forward(params, config, x_t, 300, workers=workers, **cond), want, rtol=0, atol=1e-13)


def test_training_with_one_or_two_threads_gives_the_same_losses(tmp_path):
    kw = dict(preset="tiny", steps=3, batch_size=5, save_every=3, sample_every=0, log_every=1, warmup_steps=1,
              dtype="float64", dropout=0.1, conditioning="text")
    one = Trainer(TrainConfig(out=str(tmp_path / "one"), **kw), log=lambda *a: None, ops=fast_ops(1, "threads"))
    two = Trainer(TrainConfig(out=str(tmp_path / "two"), **kw), log=lambda *a: None, ops=fast_ops(2, "threads"))
    assert one.ops.map_batch.__self__.workers == 1 and two.ops.map_batch.__self__.workers == 2
    for _ in range(3):
        one.train_step(), two.train_step()
    a, b = one.flush_losses(), two.flush_losses()
    assert one.losses == pytest.approx(two.losses, rel=1e-12) and a == pytest.approx(b, rel=1e-12)
    assert _max_rel_error(one.params, two.params) < 1e-12
    assert one.rng.bit_generator.state == two.rng.bit_generator.state  # the same draws, the masks included


def test_workers_bad_input_and_auto():
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ValueError, match="workers"):
            resolve_workers(bad)
    assert 1 <= resolve_workers(0) <= 4
    assert resolve_workers(3) == 3 and resolve_workers(3, "gpu") == 1


# ----------------------------------------------------------------------------- worker processes


@pytest.mark.parametrize("conditioning,dropout", [("none", 0.0), ("class", 0.3), ("text", 0.3)])
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("as_flat", [False, True])
def test_processes_give_the_threads_numbers_bit_for_bit(conditioning, dropout, workers, as_flat):
    config, params, x_t, x0, noise, t, cond = _setup(conditioning, dropout)
    params = flat.flatten(params) if as_flat else params
    masks = masks_of(config, 5, x0.shape)
    got = {}
    for shards in ("threads", "processes"):
        for ops in (REFERENCE, FAST):  # the workers run the table passed in: FAST travels as "fast"
            loss, grads = step(params, config, x0, noise, t, cond, masks, workers=workers, shards=shards, ops=ops)
            eps = forward(params, config, x_t, t, workers=workers, shards=shards, ops=ops, **cond)
            eps_scalar_t = forward(params, config, x_t, 300, workers=workers, shards=shards, ops=ops, **cond)
            got[shards, ops.name] = (loss, grads, eps, eps_scalar_t)
    assert any(len(pool.procs) >= workers for pool in shard_processes._POOLS.values())  # they did run there
    for name in ("reference", "fast"):
        (la, ga, ea, sa), (lb, gb, eb, sb) = got["threads", name], got["processes", name]
        assert type(lb) is type(la) and lb.dtype == la.dtype and lb == la
        assert isinstance(gb, flat.FlatDict) == as_flat and list(gb) == list(ga)
        assert all(np.array_equal(ga[k], gb[k]) for k in ga)
        assert np.array_equal(eb, ea) and np.array_equal(sb, sa)


@pytest.fixture
def fresh_pools():
    """No worker pool left from other tests: the next call starts one of exactly the workers it asks for."""
    shard_processes._close_all()
    yield
    shard_processes._close_all()


def test_a_workers_bad_input_is_a_value_error_and_a_dead_worker_is_reported(fresh_pools):
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.0, n=4)
    with pytest.raises(ValueError, match="class_labels"):  # raised in a worker, the same one line
        forward(params, config, x_t, t, class_labels=np.zeros(4, np.int64), workers=2, shards="processes")
    pool = shard_processes._POOLS[2]
    files = [desc["path"] for desc, _, _, _ in pool.files.values()]
    assert files
    pool.procs[1].kill()
    pool.procs[1].join()
    with pytest.raises(RuntimeError, match="shard worker 1 exited"):
        forward(params, config, x_t, t, workers=2, shards="processes")
    assert pool not in shard_processes._POOLS.values() and not any(os.path.exists(p) for p in files)  # closed
    want = forward(params, config, x_t, t, workers=2, shards="threads")
    assert np.array_equal(forward(params, config, x_t, t, workers=2, shards="processes"), want)  # a new pool


def test_the_shared_files_are_deleted_once_mapped_and_still_serve(fresh_pools):
    """After a step every worker has mapped the weights and gradient files: they are deleted then (a run
    killed later leaves nothing in /dev/shm), and later steps, with new weights, still see them."""
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.0, n=4)
    params = flat.flatten(params)
    forward(params, config, x_t, t, workers=2, shards="processes")
    pool = shard_processes._POOLS[2]
    step(params, config, x0, noise, t, {}, workers=2, shards="processes")
    assert not any(os.path.exists(desc["path"]) for desc, _, _, _ in pool.files.values())
    forward(params, config, x_t, t, workers=2, shards="processes")  # between two steps, as a sample grid is
    params.buffer *= 0.5  # as an optimizer step would: the next call copies the new weights in
    for shards in ("threads", "processes"):
        loss, grads = step(params, config, x0, noise, t, {}, workers=2, shards=shards)
        eps = forward(params, config, x_t, t, workers=2, shards=shards)
        if shards == "threads":
            want = (loss, grads.buffer.copy(), eps)
    assert loss == want[0] and np.array_equal(grads.buffer, want[1]) and np.array_equal(eps, want[2])



def test_bad_shards_names_the_flag_and_what_cannot_travel_is_refused():
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.0, n=4)
    with pytest.raises(ValueError, match="--shards must be one of"):
        forward(params, config, x_t, t, workers=2, shards="fibers")
    with pytest.raises(ValueError, match="--shards must be one of"):
        fast_ops(2, "fibers")
    batch = dict(x0=x0, eps=noise, t=t, class_labels=None, context=None, dropout_masks=None)
    closure = lambda b, **kw: loss_and_grads(b, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="not a module-level function"):  # a closure cannot be sent by name
        Shards(2, "processes").map_batch(closure, batch, params=params, config=config, schedule=SCHEDULE)
    loss, _ = Shards(2, "threads").map_batch(closure, batch, params=params, config=config, schedule=SCHEDULE)
    assert np.isfinite(loss)  # in threads a closure is fine
    with pytest.raises(TypeError, match="cannot travel"):  # nor a generator, which has no JSON form
        Shards(2, "processes").map_batch(loss_and_grads, batch, params=params, config=config, schedule=SCHEDULE,
                                         ops=REFERENCE, prediction_type=np.random.default_rng(0))
    with pytest.raises(ValueError, match="same number of rows"):
        Shards(2, "threads").map_batch(loss_and_grads, {**batch, "t": t[:3]}, params=params, config=config,
                                       schedule=SCHEDULE)


def test_messages_round_trip_without_pickle():
    r = np.random.default_rng(0)
    arrays = {"f32": r.standard_normal((2, 3)).astype(np.float32), "zero_d": np.asarray(np.float64(2.5)),
              "strided": r.standard_normal((4, 6))[::2, ::3], "ids": np.arange(6, dtype=np.int64).reshape(3, 2),
              "mask": np.array([True, False]), "empty": np.zeros((0, 4), np.float32)}
    meta = {"task": "forward", "rows": [0, 2, 5], "state": {"inc": 2**100 + 1}}
    got_meta, got = unpack(pack(meta, arrays))
    assert got_meta == meta and list(got) == list(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape and np.array_equal(got[k], a)
    with pytest.raises(ValueError, match="only plain numeric arrays"):
        pack({}, {"objects": np.array([None, 1], dtype=object)})


def test_shared_arguments_round_trip_as_json_and_arrays():
    """encode/decode: the config (tuples kept), the schedule (every array, exactly), the ops tables by name,
    nested dicts of arrays (the dropout masks) and plain values come back equal, through one message."""
    config = dataclasses.replace(get_preset("tiny"), num_class_embeds=4)
    masks = draw_dropout_masks(dataclasses.replace(config, dropout=0.3), np.random.default_rng(0), (2, 3, 8, 8))
    value = {"config": config, "schedule": SCHEDULE, "ops": FAST, "reference": REFERENCE, "masks": masks,
             "gamma": None, "kind": "epsilon", "scale": 2.5, "t": np.int64(7)}
    arrays = {}
    meta, got_arrays = unpack(pack({"shared": encode(value, arrays, "shared")}, arrays))
    got = decode(meta["shared"], got_arrays)
    assert got["config"] == config and got["ops"] is FAST and got["reference"] is REFERENCE
    assert all(np.array_equal(getattr(got["schedule"], f.name), getattr(SCHEDULE, f.name))
               for f in dataclasses.fields(SCHEDULE))
    assert list(got["masks"]) == list(masks) and all(np.array_equal(got["masks"][k], m) for k, m in masks.items())
    assert (got["gamma"], got["kind"], got["scale"], int(got["t"])) == (None, "epsilon", 2.5, 7)
    with pytest.raises(TypeError, match="cannot run in shard worker processes"):
        encode(dataclasses.replace(FAST, name="mine"), {}, "ops")


def test_a_smaller_batch_uses_the_first_workers_and_new_files_wait_for_all(fresh_pools):
    """A batch with fewer rows than the pool has workers runs on the first ones; a weights file made then
    (new dtype) is kept until the last worker has mapped it too."""
    config, params, x_t, _, _, t, _ = _setup("none", 0.0, n=6)
    forward(params, config, x_t, t, workers=3, shards="processes")  # a pool of 3, all files mapped
    files = [desc["path"] for desc, _, _, _ in shard_processes._POOLS[3].files.values()]
    p32 = {k: v.astype(np.float32) for k, v in params.items()}
    x32 = x_t.astype(np.float32)
    assert not any(os.path.exists(p) for p in files)
    for rows in (2, 6):  # 2 shards on the pool of 3, then all 3 on the float32 weights file made for the 2
        got = forward(p32, config, x32[:rows], t[:rows], workers=3, shards="processes")
        assert np.array_equal(got, forward(p32, config, x32[:rows], t[:rows], workers=3, shards="threads"))
        files = [desc["path"] for desc, _, _, _ in shard_processes._POOLS[3].files.values()]
        assert any(os.path.exists(p) for p in files) == (rows == 2)  # kept for worker 2, then deleted
    assert 2 not in shard_processes._POOLS  # no second pool was started


def test_a_full_dev_shm_falls_back_to_the_temp_folder(monkeypatch, tmp_path):
    """posix_fallocate refusing /dev/shm (no room) gives a file in the temp folder, not a SIGBUS later."""
    if not (os.path.isdir("/dev/shm") and hasattr(os, "posix_fallocate")):
        pytest.skip("no /dev/shm or no posix_fallocate here")
    real, refused = os.posix_fallocate, []

    def fallocate(fd, offset, n):
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.startswith("/dev/shm/"):
            refused.append(path)
            raise OSError(28, "No space left on device")
        return real(fd, offset, n)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(shard_messages.tempfile, "tempdir", str(tmp_path))
    path = shard_messages.shared_file(1000)
    assert path.startswith(str(tmp_path)) and os.path.getsize(path) == 1000
    assert refused and not any(os.path.exists(p) for p in refused)  # the refused one is gone (other runs' may be there)
