"""Training features of issue 20: gradient accumulation (= the large batch, float64), the LR schedules,
--checkpoints-total-limit, --epochs, --device auto, --resolution, class names in preview grids, and
one-line errors for bad values."""

import math

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.nn.ops import REFERENCE
from minidiff.training import previews
from minidiff.training.checkpoint import load_checkpoint
from minidiff.training.optim import lr_at, warmup_lr
from minidiff.training.trainer import Trainer, train

from tiny_runs import quiet, tiny_config


def tiny(out, **kw):
    return tiny_config(out, **(dict(steps=3, batch_size=4, save_every=3, sample_steps=2, warmup_steps=1) | kw))


@pytest.mark.parametrize("conditioning, dropout", [("class", 0.0), ("text", 0.1)])
def test_gradient_accumulation_equals_the_large_batch_in_float64(tmp_path, conditioning, dropout):
    kw = dict(dtype="float64", conditioning=conditioning, dropout=dropout, steps=2)
    big = Trainer(tiny(tmp_path / "big", batch_size=8, **kw), quiet, REFERENCE)
    acc = Trainer(tiny(tmp_path / "acc", batch_size=4, gradient_accumulation_steps=2, **kw), quiet, REFERENCE)
    four = Trainer(tiny(tmp_path / "four", batch_size=2, gradient_accumulation_steps=4, **kw), quiet, REFERENCE)
    for _ in range(2):
        losses = [float(t.train_step()) for t in (big, acc, four)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-12) and losses[2] == pytest.approx(losses[0], rel=1e-12)
    for k in big.params:
        np.testing.assert_allclose(acc.params[k], big.params[k], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(four.params[k], big.params[k], rtol=1e-10, atol=1e-13)


def test_lr_schedules():
    for step in range(12):
        assert lr_at(step, 0.1, 3, "constant", 10) == warmup_lr(step, 0.1, 3)
    assert lr_at(1, 0.1, 3, "cosine", 11) == warmup_lr(1, 0.1, 3)  # warm-up first
    assert lr_at(3, 0.1, 3, "linear", 11) == pytest.approx(0.1)
    assert lr_at(7, 0.1, 3, "linear", 11) == pytest.approx(0.05)
    assert lr_at(7, 0.1, 3, "cosine", 11) == pytest.approx(0.05)
    assert lr_at(5, 0.1, 3, "cosine", 11) == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(11, 0.1, 3, "linear", 11) == 0.0
    with pytest.raises(ValueError, match="--lr-schedule"):
        lr_at(0, 0.1, 3, "step", 11)


def test_checkpoints_total_limit_keeps_the_last_n_and_nothing_else_is_deleted(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=5, save_every=1, checkpoints_total_limit=2), log=quiet)
    (out / "checkpoints" / "my_best.npz").write_bytes(b"mine")  # the user's, in checkpoints/ but not step_*
    (out / "step_000001.npz").write_bytes(b"mine too")  # the user's, outside checkpoints/
    train(tiny(out, steps=7, save_every=1, checkpoints_total_limit=2, resume=True), log=quiet)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["latest.npz", "my_best.npz", "step_000006.npz", "step_000007.npz"]
    assert load_checkpoint(out / "checkpoints" / "step_000006.npz")[1]["step"] == 6
    assert (out / "step_000001.npz").read_bytes() == b"mine too"


def test_epochs_resolution_and_device_auto(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (10, 12, 10, 3), dtype=np.uint8),
             labels=np.arange(10) % 2, class_names=np.array(["even", "odd"]))
    cfg = tiny(tmp_path / "r", data=str(tmp_path / "d.npz"), epochs=2, batch_size=2, gradient_accumulation_steps=2,
               resolution=8, device="auto", conditioning="class")
    t = Trainer(cfg, quiet)
    assert t.cfg.steps == 5 and t.cfg.device == "cpu" and t.dataset.image_size == 8  # ceil(2 * 10 / 4)
    with pytest.raises(ValueError, match="--epochs needs a finite dataset"):
        Trainer(tiny(tmp_path / "s", epochs=1), quiet)


def test_preview_grid_is_captioned_with_class_names_and_updates_the_loss_curve(tmp_path, monkeypatch):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 8, 8), np.uint8), labels=np.array([0, 1, 0, 1]),
             class_names=np.array(["zero", "one"]))
    seen = {}
    monkeypatch.setattr(previews, "save_grid", lambda x, path, labels, ncol: seen.setdefault("labels", labels))
    t = Trainer(tiny(tmp_path / "r", data=str(tmp_path / "d.npz"), conditioning="class"), quiet)
    t.train_step()
    t.flush_losses()
    t.sample_grid(n=4)
    assert seen["labels"] == ["zero", "one", "zero", "one"]
    assert (tmp_path / "r" / "loss.png").exists()


@pytest.mark.parametrize("flags, match", [
    (["--resolution", "0"], "--resolution must be in"),
    (["--resolution", "4096"], "--resolution must be in"),
    (["--random-crop"], "--random-crop needs --resolution"),
    (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1"),
    (["--lr-schedule", "step"], "--lr-schedule"),
    (["--checkpoints-total-limit", "0"], "--checkpoints-total-limit must be >= 1"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
])
def test_bad_training_flags_are_one_line(tmp_path, capsys, flags, match):
    assert main(["train", "--out", str(tmp_path / "r"), "--preset", "tiny", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert match in err and "\n" not in err
