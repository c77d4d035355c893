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


@pytest.fixture(scope="module")
def eval_clf(tmp_path_factory):
    """A 5-step eval classifier (tiny preset) of _two_classes(): its data file, folder, arrays and meta."""
    from minidiff.training.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("eval_clf")
    np.savez(root / "d.npz", **_two_classes())
    get_eval_classifier(load_dataset(str(root / "d.npz")), root / "clf", EvalClassifierConfig(preset="tiny", steps=5),
                        log=lambda s: None)
    arrays, meta = load_checkpoint(root / "clf" / "checkpoints" / "latest.npz")
    return root, arrays, meta


def _drop(d, key):
    d.pop(key)


# (id, change(arrays, meta), the field the one line names): a damaged or hand-edited eval classifier cache
DAMAGED_EVAL_CLASSIFIER = [
    ("no-model_config", lambda a, m: _drop(m, "model_config"), "model_config"),
    ("model_config-int", lambda a, m: m.update(model_config=5), "model_config"),
    ("model_config-conditional", lambda a, m: m["model_config"].update(num_class_embeds=2), "model_config"),
    ("no-class_names", lambda a, m: _drop(m, "class_names"), "class_names"),
    ("class_names-str", lambda a, m: m.update(class_names="ab"), "class_names"),
    ("class_names-3", lambda a, m: m.update(class_names=["a", "b", "c"]), "params/"),
    ("key-str", lambda a, m: m.update(key="x"), "key"),
    ("no-heldout_n", lambda a, m: _drop(m, "heldout_n"), "heldout_n"),
    ("heldout_accuracy-str", lambda a, m: m.update(heldout_accuracy="high"), "heldout_accuracy"),
    ("heldout_accuracy-nan", lambda a, m: m.update(heldout_accuracy=float("nan")), "heldout_accuracy"),
    ("no-params", lambda a, m: _drop(a, "params"), "params/"),
    ("params-missing-one", lambda a, m: _drop(a["params"], "head.linear.bias"), "params/"),
    ("params-wrong-shape", lambda a, m: a["params"].update({"head.norm.weight": np.zeros(3, np.float32)}),
     "params/head.norm.weight"),
    ("no-heldout", lambda a, m: _drop(a, "heldout"), "heldout/"),
    ("sigma-wrong-shape", lambda a, m: a["heldout"].update(sigma=np.zeros((2, 2))), "heldout/sigma"),
    ("mu-nan", lambda a, m: a["heldout"].update(mu=a["heldout"]["mu"] * np.nan), "heldout/mu"),
]


@pytest.mark.parametrize("change, field", [c[1:] for c in DAMAGED_EVAL_CLASSIFIER],
                         ids=[c[0] for c in DAMAGED_EVAL_CLASSIFIER])
def test_a_damaged_eval_classifier_cache_is_one_valueerror_naming_the_file_and_field(eval_clf, tmp_path, change,
                                                                                     field):
    """Its metadata and arrays are checked field by field when loaded (run_meta.check_eval_classifier), like a
    checkpoint's: never a KeyError/TypeError traceback, nor a bad value that fails later, in eval."""
    import json as json_

    from minidiff.training.checkpoint import save_checkpoint

    root, arrays, meta = eval_clf
    arrays = {g: dict(v) for g, v in arrays.items()}
    meta = json_.loads(json_.dumps(meta))
    change(arrays, meta)
    ckpt = tmp_path / "clf" / "checkpoints" / "latest.npz"
    save_checkpoint(ckpt, arrays, meta)
    with pytest.raises(ValueError) as err:
        get_eval_classifier(load_dataset(str(root / "d.npz")), tmp_path / "clf", log=lambda s: None)
    msg = str(err.value)
    assert str(ckpt) in msg and field in msg and "\n" not in msg, msg
