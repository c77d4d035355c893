"""`minidiff eval --nll` on a labelled .npz: a tiny run trained on it, scored on a held-out .npz (read in order,
its first n images, given their own labels) by the strided estimate over a few timesteps; one line for a
held-out set the model cannot take; bad checkpoints (C outputs for learned_range, NaN weights) one line each."""

import json

import numpy as np

from minidiff.cli import main
from minidiff.nll import evaluate_nll
from minidiff.training.checkpoint import load_checkpoint, save_checkpoint
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import train


def write_npz(path, n, seed, size=8):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = np.zeros((n, size, size, 3), np.uint8)
    for i, k in enumerate(labels):                       # class k: a bright square in a third of the image
        images[i, :, :, k] = rng.integers(0, 60)
        images[i, 2:6, 1 + 2 * k:3 + 2 * k] = rng.integers(150, 256, 3)
    np.savez(path, images=images, labels=labels)
    return path


def quiet(*a, **k):
    pass


def test_eval_nll_on_an_npz_dataset(tmp_path, capsys):
    train_npz, held = write_npz(tmp_path / "train.npz", 16, 0), write_npz(tmp_path / "held.npz", 6, 1)
    for vt in ("fixed_small", "learned_range"):
        out = tmp_path / vt
        train(TrainConfig(data=str(train_npz), out=str(out), preset="tiny", steps=2, batch_size=4, save_every=2,
                          sample_every=0, log_every=1, warmup_steps=1, num_train_timesteps=50, variance_type=vt,
                          threads=1), log=quiet)
        assert main(["eval", "--nll", "--checkpoint", str(out), "--data", str(held), "--n", "3", "--batch-size",
                     "2", "--nll-timesteps", "5", "--reference", "--out", str(tmp_path / f"e_{vt}")]) == 0
        saved = json.loads((tmp_path / f"e_{vt}" / "nll.json").read_text())
        assert saved["data"] == "held" and saved["n"] == 3 and saved["variance_type"] == vt
        assert saved["kind"].startswith("strided estimate (6 of 50") and np.isfinite(saved["bits_per_dim"])
        assert saved["bits_per_dim"] > 0 and saved["standard_error"] > 0
        run = out
    # a fixed set is read in order: its first 3 images score as an .npz of those 3 alone
    with np.load(held) as z:
        np.savez(tmp_path / "first3.npz", images=z["images"][:3], labels=z["labels"][:3])
    kw = dict(n=3, timesteps=5, reference=True, log=quiet)
    a = evaluate_nll(run, data=str(held), out=str(tmp_path / "a"), **kw)
    b = evaluate_nll(run, data=str(tmp_path / "first3.npz"), out=str(tmp_path / "b"), **kw)
    assert a["bits_per_dim"] == b["bits_per_dim"]
    # the run's own data by default (the training .npz)
    assert evaluate_nll(run, out=str(tmp_path / "c"), **kw)["data"] == "train"
    capsys.readouterr()
    write_npz(tmp_path / "big.npz", 4, 2, size=16)
    assert main(["eval", "--nll", "--checkpoint", str(run), "--data", str(tmp_path / "big.npz"), "--n", "2",
                 "--nll-timesteps", "5", "--reference"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "16x16" in err[0] and "8x8" in err[0]


def test_a_learned_range_run_with_c_output_channels_is_one_line_everywhere(tmp_path, capsys):
    """A checkpoint whose config says learned_range but whose U-Net outputs C channels: one line from
    eval --nll and from sample (ddpm, ddim, euler); a true learned_range run samples with euler (2C stripped).
    A NaN in the bound: one line naming the timestep where it appeared."""
    data = write_npz(tmp_path / "d.npz", 8, 0)
    kw = dict(data=str(data), preset="tiny", steps=1, batch_size=4, save_every=1, sample_every=0, sample_steps=2,
              log_every=1, warmup_steps=1, num_train_timesteps=20, threads=1)
    train(TrainConfig(out=str(tmp_path / "small"), variance_type="fixed_small", **kw), log=quiet)
    arrays, meta = load_checkpoint(tmp_path / "small" / "checkpoints" / "latest.npz")
    meta["train_config"]["variance_type"] = "learned_range"
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    save_checkpoint(tmp_path / "bad" / "checkpoints" / "latest.npz", arrays, meta)
    capsys.readouterr()
    runs = [["eval", "--nll", "--checkpoint", str(tmp_path / "bad"), "--n", "2", "--nll-timesteps", "4",
             "--reference", "--out", str(tmp_path / "e")]]
    runs += [["sample", "--checkpoint", str(tmp_path / "bad"), "--n", "2", "--steps", "2", "--sampler", s,
              "--reference", "--out", str(tmp_path / s)] for s in ("ddpm", "ddim", "euler")]
    for argv in runs:
        assert main(argv) != 0, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "2C = 6 channels" in err[0] and "learned_range" in err[0], (argv, err)
    train(TrainConfig(out=str(tmp_path / "lr"), variance_type="learned_range", **kw), log=quiet)
    assert main(["sample", "--checkpoint", str(tmp_path / "lr"), "--n", "2", "--steps", "2", "--sampler", "euler",
                 "--reference", "--out", str(tmp_path / "lr_euler")]) == 0
    # a NaN in the bound (here finite weights scaled to 1e30: the output overflows) stops eval --nll at the
    # first timestep it visits, t = T - 1 (NaN weights are refused when the checkpoint loads: issue 17)
    def huge_like(tree):
        return {k: huge_like(v) if isinstance(v, dict) else np.full_like(v, 1e30) for k, v in tree.items()}
    arrays["ema"] = huge_like(arrays["ema"])
    save_checkpoint(tmp_path / "bad" / "checkpoints" / "latest.npz", arrays, dict(meta, train_config=dict(
        meta["train_config"], variance_type="fixed_small")))
    capsys.readouterr()
    assert main(["eval", "--nll", "--checkpoint", str(tmp_path / "bad"), "--n", "2", "--reference",
                 "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at t = 19 (the KL to q(x_(t-1) | x_t, x_0))" in err[0], err
