"""The ops record of a run (run_folder.ops_record: {"name", "shards", "device"}) names the device too: a GPU run
resumed on the CPU (or a CPU run on a GPU) is not bit-exact, and the resume says so in one line; a record from
before the device was recorded reads as a CPU run, so an old checkpoint resumes on the CPU without a notice.
The GPU side runs on the fake CuPy (tests/fake_cupy.py)."""

import json

import pytest

from minidiff.fast.ops import fast_ops
from minidiff.nn.ops import REFERENCE
from minidiff.training.checkpoint import load_checkpoint, save_checkpoint
from minidiff.training.run_folder import ops_notice, ops_record, recorded_shards
from minidiff.training.trainer import train

from tiny_runs import tiny_config


def tiny_cfg(out, **kw):
    return tiny_config(out, **(dict(steps=6, batch_size=2, save_every=2, sample_steps=1, warmup_steps=2) | kw))


def notices(out, ops, **kw) -> list:
    """The bit-exact notices of a one-step resume of out with ops."""
    lines = []
    train(tiny_cfg(out, resume=True, **kw), stop_after=1, ops=ops, log=lines.append)
    return [s for s in lines if "bit-exact" in s]


@pytest.mark.parametrize("name", ["fast", "reference"])
def test_a_gpu_run_resumed_on_the_cpu_says_the_device_changed(tmp_path, monkeypatch, name):
    """The same ops and one shard on both sides, but a GPU run continued on the CPU: its record names the GPU (not
    "1 CPU shard(s)") and the resume prints one notice naming both devices and --device gpu (no notice before)."""
    import fake_cupy

    ops, out = (fast_ops(1, "threads") if name == "fast" else REFERENCE), tmp_path / "run"
    fake_cupy.install(monkeypatch)
    train(tiny_cfg(out, device="gpu"), stop_after=2, ops=ops, log=lambda *a: None)
    monkeypatch.undo()
    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta["ops"] == {"name": name, "shards": 1, "device": "gpu"}
    assert json.loads((out / "config.json").read_text())["ops"] == meta["ops"]
    said = notices(out, ops)
    assert len(said) == 1 and "\n" not in said[0], said
    was, now = said[0].split(" and this resume runs ")
    assert "on the GPU" in was and "CPU" not in was and "CPU" in now and "--device gpu" in now
    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta["ops"] == {"name": name, "shards": 1, "device": "cpu"}  # the newest save's setting


def test_a_cpu_run_resumed_on_a_gpu_with_the_same_ops_says_the_device_changed():
    """A reference CPU run continued by the reference ops on a GPU: the name and the shard count are the same, the
    device is not: one notice advising --device cpu (there was none)."""
    said = ops_notice(ops_record(REFERENCE), ops_record(REFERENCE, gpu=True))
    assert said and "on the GPU" in said and "--device cpu" in said and "--threads" not in said
    assert ops_notice(ops_record(REFERENCE, gpu=True), ops_record(REFERENCE, gpu=True)) is None


def test_an_old_ops_record_without_a_device_reads_as_a_cpu_run(tmp_path):
    """A checkpoint written before the device was recorded ({"name", "shards"}) still resumes on the CPU with the
    same ops without a notice, and keeps its shard count for --threads 0; on a GPU it gets the device notice."""
    out = tmp_path / "run"
    train(tiny_cfg(out), stop_after=2, ops=fast_ops(2, "threads"), log=lambda *a: None)
    path = out / "checkpoints" / "latest.npz"
    arrays, meta = load_checkpoint(path)
    save_checkpoint(path, arrays, meta | {"ops": {"name": "fast", "shards": 2}})  # as older versions wrote it
    assert recorded_shards(out) == 2
    assert ops_notice({"name": "fast", "shards": 2}, ops_record(fast_ops(2, "threads"))) is None
    assert "--device cpu --threads 2" in ops_notice({"name": "fast", "shards": 2}, ops_record(REFERENCE, gpu=True))
    assert notices(out, fast_ops(2, "threads")) == []
    _, meta = load_checkpoint(path)
    assert meta["step"] == 3 and meta["ops"] == {"name": "fast", "shards": 2, "device": "cpu"}
