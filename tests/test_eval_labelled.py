"""minidiff eval on any labelled data (eval_labelled.py, training/eval_classifier.py), --eval-every, and the
Python API with in-memory arrays (train(cfg, data=...), generate(path, ...))."""

import json

import numpy as np
import pytest

import minidiff
from minidiff.cli import main
from minidiff.training.config import TrainConfig
from minidiff.training.eval_classifier import EvalClassifierConfig, get_eval_classifier, heldout_split
from minidiff.data import load_dataset


def _two_classes(n=60, s=8, seed=0):
    """Class 0: top half bright, class 1: left half bright, plus noise (uint8 NHW)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    x = np.zeros((n, s, s), np.int64)
    x[labels == 0, : s // 2] = 255
    x[labels == 1, :, : s // 2] = 255
    return {"images": np.clip(x + rng.integers(-30, 30, x.shape), 0, 255).astype(np.uint8), "labels": labels}


def _cfg(out, **kw):
    base = dict(out=str(out), preset="tiny", steps=4, batch_size=8, sample_steps=2, log_every=1, save_every=4,
                sample_every=0, conditioning="class", eval_classifier_steps=5, eval_n_per_class=2)
    return TrainConfig(**(base | kw))


def test_eval_every_logs_and_leaves_training_identical(tmp_path):
    data = _two_classes()
    plain = minidiff.train(_cfg(tmp_path / "a"), data=data, log=lambda s: None)
    evald = minidiff.train(_cfg(tmp_path / "b", eval_every=2), data=data, log=lambda s: None)
    assert plain["losses"] == evald["losses"]  # the eval draws nothing from the training generator
    rows = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["eval_accuracy"] <= 1 and np.isfinite(r["eval_frechet"]) for r in evals)
    assert (tmp_path / "b" / "eval_classifier" / "checkpoints" / "latest.npz").exists()
    assert not any("eval_accuracy" in json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines())


def test_in_memory_data_trains_like_the_npz(tmp_path):
    data = _two_classes()
    np.savez(tmp_path / "d.npz", **data)
    a = minidiff.train(_cfg(tmp_path / "a", data=str(tmp_path / "d.npz")), log=lambda s: None)
    b = minidiff.train(_cfg(tmp_path / "b"), data=data, log=lambda s: None)
    c = minidiff.train(_cfg(tmp_path / "c", conditioning="none"), data=data["images"][..., None].repeat(3, -1),
                       log=lambda s: None)  # the images alone (NHWC, 3 channels): unconditional
    assert a["losses"] == b["losses"] and len(c["losses"]) == 4
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train_config"]["data"] == "<arrays>"
    x = minidiff.generate(str(tmp_path / "b"), np.array([0, 1]), n=2, steps=2)
    assert x.shape == (2, 1, 8, 8) and np.abs(x).max() <= 1


def test_cli_eval_on_an_npz_run(tmp_path, capsys):
    np.savez(tmp_path / "d.npz", **_two_classes())
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "d.npz"), "--out", str(run), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "8", "--sample-steps", "2", "--threads", "1", "--shards", "threads"]) == 0
    clf = get_eval_classifier(load_dataset(str(tmp_path / "d.npz")), tmp_path / "clf",
                              EvalClassifierConfig(preset="tiny", steps=5), log=lambda s: None)
    argv = ["eval", "--checkpoint", str(run), "--n-per-class", "3", "--scales", "0", "2", "--steps", "2",
            "--threads", "1", "--shards", "threads", "--eval-classifier", str(tmp_path / "clf")]
    assert main(argv) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["n"] == 6 and set(result["accuracy"]) == {"0", "2"} and set(result["frechet"]) == {"0", "2"}
    assert result["heldout_accuracy"] == clf.meta["heldout_accuracy"] and result["heldout_n"] == 6
    assert all(v >= -1e-6 for v in result["frechet"].values())
    again = json.loads((run / "eval.json").read_text()) if main(argv) == 0 else None
    timeless = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731 (wall time varies)
    assert again is not None and timeless(again) == timeless(result)  # same classifier, same seed
    # a classifier folder made for other data is refused, not retrained
    np.savez(tmp_path / "e.npz", **_two_classes(seed=1))
    with pytest.raises(ValueError, match="other data"):
        get_eval_classifier(load_dataset(str(tmp_path / "e.npz")), tmp_path / "clf", log=lambda s: None)


def test_heldout_split_and_bad_input(tmp_path):
    train, held = heldout_split(60)
    assert len(held) == 6 and not set(train) & set(held) and len(train) + len(held) == 60
    assert np.array_equal(heldout_split(60)[1], held)  # fixed
    with pytest.raises(ValueError, match="--eval-every"):
        minidiff.train(_cfg(tmp_path / "x", eval_every=-1), data=_two_classes(), log=lambda s: None)
    with pytest.raises(ValueError, match="--eval-every needs"):
        minidiff.train(_cfg(tmp_path / "y", eval_every=2, conditioning="none"), data=_two_classes(),
                       log=lambda s: None)
    with pytest.raises(ValueError, match="class_names"):
        load_dataset({"images": np.zeros((4, 8, 8), np.uint8), "labels": np.arange(4) % 2,
                      "class_names": np.array(["a"])})
