"""The batch's shards in worker processes (minidiff/fast/cpu/shard_processes.py, --shards processes): the same
loss, gradients, rng state and outputs as the shards in threads, bit for bit; errors come back."""

import os

import numpy as np
import pytest

from minidiff.fast import flat
from minidiff.fast.cpu import shard_messages
from minidiff.fast.cpu import shard_processes
from minidiff.fast.cpu.shards import forward, loss_and_grads
from minidiff.fast.cpu.shard_messages import pack, unpack
from test_parallel import SCHEDULE, _setup


@pytest.mark.parametrize("conditioning,dropout", [("none", 0.0), ("class", 0.3), ("text", 0.3)])
@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("as_flat", [False, True])
def test_processes_give_the_threads_numbers_bit_for_bit(conditioning, dropout, workers, as_flat):
    config, params, x_t, x0, noise, t, cond = _setup(conditioning, dropout)
    params = flat.flatten(params) if as_flat else params
    got = {}
    for shards in ("threads", "processes"):
        rng = np.random.default_rng(5)
        loss, grads = loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, rng=rng, workers=workers,
                                     shards=shards, **cond)
        eps = forward(params, config, x_t, t, workers=workers, shards=shards, **cond)
        eps_scalar_t = forward(params, config, x_t, 300, workers=workers, shards=shards, **cond)
        got[shards] = (loss, grads, rng.bit_generator.state, eps, eps_scalar_t)
    assert any(len(pool.procs) >= workers for pool in shard_processes._POOLS.values())  # they did run there
    (la, ga, ra, ea, sa), (lb, gb, rb, eb, sb) = got["threads"], got["processes"]
    assert type(lb) is type(la) and lb.dtype == la.dtype and lb == la
    assert isinstance(gb, flat.FlatDict) == as_flat and list(gb) == list(ga)
    assert all(np.array_equal(ga[k], gb[k]) for k in ga)
    assert rb == ra  # as many dropout seeds drawn as one unsplit forward
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
    loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, workers=2, shards="processes")
    assert not any(os.path.exists(desc["path"]) for desc, _, _, _ in pool.files.values())
    forward(params, config, x_t, t, workers=2, shards="processes")  # between two steps, as a sample grid is
    params.buffer *= 0.5  # as an optimizer step would: the next call copies the new weights in
    for shards in ("threads", "processes"):
        loss, grads = loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, workers=2, shards=shards)
        eps = forward(params, config, x_t, t, workers=2, shards=shards)
        if shards == "threads":
            want = (loss, grads.buffer.copy(), eps)
    assert loss == want[0] and np.array_equal(grads.buffer, want[1]) and np.array_equal(eps, want[2])


def test_bad_shards_names_the_flag():
    config, params, x_t, x0, noise, t, _ = _setup("none", 0.0, n=4)
    with pytest.raises(ValueError, match="--shards must be one of"):
        forward(params, config, x_t, t, workers=2, shards="fibers")
    with pytest.raises(ValueError, match="rng must be a PCG64 Generator"):  # its state would not travel as JSON
        loss_and_grads(params, config, SCHEDULE, x_t, x0, noise, t, rng=np.random.Generator(np.random.MT19937(0)),
                       workers=2, shards="processes")


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
    real = os.posix_fallocate

    def fallocate(fd, offset, n):
        if os.readlink(f"/proc/self/fd/{fd}").startswith("/dev/shm/"):
            raise OSError(28, "No space left on device")
        return real(fd, offset, n)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    monkeypatch.setattr(shard_messages.tempfile, "tempdir", str(tmp_path))
    path = shard_messages.shared_file(1000)
    assert path.startswith(str(tmp_path)) and os.path.getsize(path) == 1000
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("minidiff-shard-")]  # the refused one is gone
