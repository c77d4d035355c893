"""Checkpoints: exact round trip, atomic writes, clear errors on corrupt files and config mismatch."""

import json
import os

import numpy as np
import pytest

from minidiff.training import checkpoint
from minidiff.training.checkpoint import check_config, load_checkpoint, rng_from_state, rng_state, save_checkpoint
from minidiff.data.tokenizer import Tokenizer
from minidiff.training.optim import EMA, AdamW


def training_state(seed=0):
    rng = np.random.default_rng(seed)
    params = {"conv_in.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
              "conv_in.bias": rng.standard_normal(4).astype(np.float32),
              "time_embedding.linear_1.weight": rng.standard_normal((8, 4))}
    opt = AdamW(params, lr=1e-3)
    ema = EMA(params, decay=0.99)
    for _ in range(2):
        opt.step(params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()})
        ema.update(params)
    return params, opt, ema


def test_round_trip_is_exact(tmp_path):
    params, opt, ema = training_state()
    ost, est = opt.state_dict(), ema.state_dict()
    data_rng = np.random.default_rng(123)
    data_rng.standard_normal(17)  # advance it somewhere
    tok = Tokenizer.from_captions(["small red circle", "blue square"])
    meta = {"step": 2, "model_config": {"base_channels": 32, "attn": [False, True]},
            "rng": rng_state(data_rng), "tokenizer": tok.to_dict(), "losses": [0.5, np.float32(0.25)],
            "opt_step": ost["step"], "opt_hparams": ost["hparams"], "ema_updates": est["num_updates"]}
    arrays = {"params": params, "ema": est["shadow"],
              "opt": {"exp_avg": ost["exp_avg"], "exp_avg_sq": ost["exp_avg_sq"]},
              "extra": {"uint8s": np.arange(5, dtype=np.uint8), "scalar": np.float64(3.5)}}
    path = save_checkpoint(tmp_path / "run" / "ckpt.npz", arrays, meta)
    assert path.is_file() and os.listdir(path.parent) == ["ckpt.npz"]  # no temp file left
    got, got_meta = load_checkpoint(path)
    assert set(got) == {"params", "ema", "opt", "extra"}
    for k, v in params.items():
        assert got["params"][k].dtype == v.dtype
        np.testing.assert_array_equal(got["params"][k], v)
        np.testing.assert_array_equal(got["ema"][k], ema.shadow[k])
        np.testing.assert_array_equal(got["opt"]["exp_avg_sq"][k], opt.exp_avg_sq[k])
    assert got["extra"]["scalar"].shape == () and got["extra"]["scalar"] == 3.5
    assert got_meta["model_config"] == meta["model_config"] and got_meta["losses"] == [0.5, 0.25]
    assert Tokenizer.from_dict(got_meta["tokenizer"]).vocab == tok.vocab
    # the generator continues exactly where it stopped
    restored = rng_from_state(got_meta["rng"])
    np.testing.assert_array_equal(restored.standard_normal(9), data_rng.standard_normal(9))
    np.testing.assert_array_equal(restored.integers(0, 100, 9), data_rng.integers(0, 100, 9))
    # the optimizer and EMA resume from the file alone
    opt2 = AdamW({k: v.copy() for k, v in params.items()}, lr=1e-3)
    opt2.load_state_dict({"step": got_meta["opt_step"], "hparams": got_meta["opt_hparams"], **got["opt"]})
    assert opt2.step_count == 2
    np.testing.assert_array_equal(opt2.exp_avg["conv_in.bias"], opt.exp_avg["conv_in.bias"])


@pytest.mark.parametrize("bitgen", ["PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937"])
def test_rng_state_survives_json(bitgen):
    rng = np.random.Generator(getattr(np.random, bitgen)(7))
    rng.random(3)
    state = json.loads(json.dumps(rng_state(rng)))
    np.testing.assert_array_equal(rng_from_state(state).random(5), rng.random(5))


def test_corrupt_or_truncated_file_gives_one_clear_error(tmp_path):
    params, _, _ = training_state()
    path = save_checkpoint(tmp_path / "c.npz", {"params": params}, {"step": 1})
    blob = path.read_bytes()
    for name, bad in [("trunc.npz", blob[: len(blob) // 2]), ("garbage.npz", b"hello"), ("empty.npz", b""),
                      ("flipped.npz", blob[:200] + bytes([blob[200] ^ 0xFF]) + blob[201:])]:
        (tmp_path / name).write_bytes(bad)
        with pytest.raises(ValueError, match=rf"checkpoint '.*{name}' is corrupt or truncated") as info:
            load_checkpoint(tmp_path / name)
        assert "\n" not in str(info.value)
    np.savez(tmp_path / "nometa.npz", a=np.ones(2))  # an .npz that is not a checkpoint
    with pytest.raises(ValueError, match="not a minidiff checkpoint"):
        load_checkpoint(tmp_path / "nometa.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.npz")


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "latest.npz", {"params": {"w": np.ones(3)}}, {"step": 1})
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"PK partial bytes")  # a crash half-way through writing
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"params": {"w": np.zeros(3)}}, {"step": 2})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["latest.npz"]  # the temp file is cleaned up
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    assert meta["step"] == 1 and np.array_equal(arrays["params"]["w"], np.ones(3))


def test_overwrite_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "latest.npz"
    save_checkpoint(path, {"params": {"w": np.ones(3)}}, {"step": 1})
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.path.basename(src), os.path.basename(dst)))
        assert load_checkpoint(dst)[1]["step"] == 1  # the old file is intact until the swap
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", spy)
    save_checkpoint(path, {"params": {"w": np.zeros(3)}}, {"step": 2})
    assert seen == [(f"latest.npz.tmp-{os.getpid()}", "latest.npz")]
    assert load_checkpoint(path)[1]["step"] == 2


def test_check_config_names_the_field():
    cfg = {"base_channels": 32, "channel_mult": [1, 2], "attn_resolutions": [8]}
    check_config(cfg, dict(cfg))
    with pytest.raises(ValueError, match=r"checkpoint 'x.npz' was made with model config base_channels=64, "
                                         r"but this run has base_channels=32"):
        check_config({**cfg, "base_channels": 64}, cfg, path="x.npz")
    with pytest.raises(ValueError, match="dropout='<missing>'"):
        check_config(cfg, {**cfg, "dropout": 0.1})


def test_bad_input():
    with pytest.raises(ValueError, match="without '/'"):
        save_checkpoint("unused.npz", {"a/b": np.ones(1)})
    with pytest.raises(ValueError, match="JSON-serializable"):
        save_checkpoint("unused.npz", {"a": np.ones(1)}, {"bad": object()})
    with pytest.raises(ValueError, match="dtype object"):
        save_checkpoint("unused.npz", {"a": np.array([None])})
    with pytest.raises(ValueError, match="bit generator"):
        rng_from_state({"bit_generator": "Nope"})
    assert not os.path.exists("unused.npz")
