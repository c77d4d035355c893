"""Training the guidance classifier and guiding with it: a short run on shapes16 that learns, saves,
loads and refuses to overwrite; prompt / class targets; the grad_fn; classifier-guided sampling with
an analytic and with a trained classifier; the CLI flags; a NaN loss; bad input.

The runs are tiny (tiny preset, batch 8, 30 steps). Learning is judged on a fixed noisy batch against
the classifier's own initialization; guidance on an analytic "diffusion model" (a Gaussian or a
two-Gaussian mixture, whose eps* is closed-form), so no diffusion network is trained here.
"""

import argparse
import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from minidiff.training.bundle import Bundle
from minidiff.training.checkpoint import load_checkpoint, save_checkpoint
from minidiff.model.classifier import classifier_forward, classifier_init_params, classifier_param_shapes, log_prob_grad
from minidiff.training.classifier import ClassifierTrainConfig, add_classifier_parser, load_classifier, train_classifier
from minidiff.training.config import SampleConfig
from minidiff.data import load_dataset
from minidiff.diffusion.guidance import make_classifier_guided_model_fn
from minidiff.nn import softmax_cross_entropy_forward
from minidiff.training.generate import generate
from minidiff.diffusion.sampler import sample
from minidiff.diffusion.schedule import add_noise, make_schedule
from minidiff.model.config import get_preset

TINY = get_preset("tiny")


def _quiet(fn, *args, **kwargs):
    with contextlib.redirect_stderr(io.StringIO()):
        return fn(*args, log=lambda *a: None, **kwargs)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """30 steps on shapes16 with the tiny preset (T = 100: every t still shows the image)."""
    out = tmp_path_factory.mktemp("clf") / "run"
    cfg = ClassifierTrainConfig(data="shapes16", out=str(out), preset="tiny", steps=30, batch_size=8, lr=5e-3,
                                warmup_steps=5, save_every=20, log_every=10, num_train_timesteps=100)
    return cfg, _quiet(train_classifier, cfg)


def test_train_classifier_learns_saves_and_loads(shapes_run):
    cfg, summary = shapes_run
    losses = summary["losses"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    # a fixed noisy batch: the loaded classifier beats its initialization (ln 9 = 2.197 is chance)
    ds, rng = load_dataset("shapes16"), np.random.default_rng(123)
    x0, y, _ = ds.batch(rng, 64)
    t = rng.integers(0, 100, 64)
    x_t = add_noise(make_schedule(100), x0, rng.standard_normal(x0.shape).astype(np.float32), t)
    clf = load_classifier(cfg.out)
    init = classifier_init_params(clf.config, 9, seed=0)
    before = float(softmax_cross_entropy_forward(classifier_forward(init, clf.config, x_t, t)[0], y)[0])
    after = float(softmax_cross_entropy_forward(classifier_forward(clf.params, clf.config, x_t, t)[0], y)[0])
    assert after < before - 0.1, (before, after)
    # the checkpoint: meta, keys, dtype; the run dir's files
    arrays, meta = load_checkpoint(f"{cfg.out}/checkpoints/latest.npz")
    assert meta["kind"] == "classifier" and meta["num_classes"] == 9 and meta["step"] == 30
    assert meta["class_names"][0] == "red circle" and meta["train_config"] == dataclasses.asdict(cfg)
    assert meta["losses"] == losses and clf.config.sample_size == 16 and clf.num_classes == 9
    assert set(arrays["params"]) == set(classifier_param_shapes(clf.config, 9))
    assert clf.params["conv_in.weight"].dtype == np.float32
    clf64 = load_classifier(f"{cfg.out}/checkpoints/latest.npz", dtype="float64")
    np.testing.assert_allclose(clf64.log_probs(x_t[:4].astype(np.float64), t[:4]), clf.log_probs(x_t[:4], t[:4]),
                               atol=1e-4)
    log = [json.loads(line) for line in open(f"{cfg.out}/log.jsonl")]
    assert [r["step"] for r in log] == [10, 20, 30] and log[-1]["loss"] == losses[-1]
    # a second run into the same folder is refused and changes nothing
    before_bytes = open(f"{cfg.out}/checkpoints/latest.npz", "rb").read()
    with pytest.raises(FileExistsError, match="already holds"):
        _quiet(train_classifier, cfg)
    assert open(f"{cfg.out}/checkpoints/latest.npz", "rb").read() == before_bytes


def test_targets_and_grad_fn(shapes_run):
    cfg, _ = shapes_run
    clf = load_classifier(cfg.out)
    names = clf.class_names
    text = Bundle({}, clf.config, clf.schedule, "text", class_names=names)
    got = clf.targets_for(text, None, ["red circle", "a small blue triangle", "large green square"], SampleConfig(n=3))
    assert got.tolist() == [names.index("red circle"), names.index("blue triangle"), names.index("green square")]
    with pytest.raises(ValueError, match="'purple hexagon' names no class"):
        clf.targets_for(text, None, ["red circle", "purple hexagon"], SampleConfig(n=2))
    klass = Bundle({}, clf.config, clf.schedule, "class", num_classes=9, class_names=names)
    assert clf.targets_for(klass, np.array([4, 1]), None, SampleConfig(n=2)).tolist() == [4, 1]
    none = Bundle({}, clf.config, clf.schedule, "none")
    assert clf.targets_for(none, None, None, SampleConfig(n=3, class_id=5)).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="pass --class"):
        clf.targets_for(none, None, None, SampleConfig(n=3))
    with pytest.raises(ValueError, match=r"--class must be in \[0, 9\)"):
        clf.targets_for(none, None, None, SampleConfig(n=3, class_id=9))
    with pytest.raises(ValueError, match="num-train-timesteps"):
        clf.targets_for(Bundle({}, clf.config, make_schedule(1000), "none"), None, None, SampleConfig(class_id=1))
    with pytest.raises(ValueError, match="reads 16x16"):
        clf.targets_for(Bundle({}, TINY, clf.schedule, "none"), None, None, SampleConfig(class_id=1))
    # grad_fn ignores the model's condition y and uses its own labels
    x, t = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32), np.array([3, 60])
    grad_fn = clf.make_grad_fn([2, 7])
    np.testing.assert_array_equal(grad_fn(x, t, "ignored"), log_prob_grad(clf.params, clf.config, x, t, [2, 7]))
    with pytest.raises(ValueError, match="labels must lie in"):
        clf.make_grad_fn([0, 9])
    with pytest.raises(ValueError, match="2 labels"):
        grad_fn(x[:1], t[:1])


def _mixture(schedule, means, s):
    """Data = equal mixture of N(m_k, s^2 I): the exact eps*(x_t) and grad_x log p(y | x_t) (module-free)."""
    def posterior(x, t):
        ab = schedule.alphas_cumprod[int(t[0])]
        v = ab * s * s + 1 - ab  # each component of q(x_t) is N(sqrt(ab) m_k, v I)
        d2 = ((x[:, None] - math.sqrt(ab) * means[None]) ** 2).sum((2, 3, 4))  # (N, K)
        w = np.exp(-(d2 - d2.min(1, keepdims=True)) / (2 * v))
        return ab, v, w / w.sum(1, keepdims=True)

    def eps(x, t, cond):
        ab, v, w = posterior(x, t)
        return (math.sqrt(1 - ab) * (x - math.sqrt(ab) * np.einsum("nk,k...->n...", w, means)) / v).astype(x.dtype)

    def grad_fn_for(target):
        def grad_fn(x, t, y):  # grad log p(y | x_t) = sqrt(ab) (m_y - sum_k w_k m_k) / v
            ab, v, w = posterior(x, t)
            return (math.sqrt(ab) * (means[target] - np.einsum("nk,k...->n...", w, means)) / v).astype(x.dtype)
        return grad_fn
    return eps, grad_fn_for


def _two_colors(tmp_path, n=64, size=8):
    """An .npz of red (label 0) and blue (label 1) images with pixel jitter, and the two colors in [-1, 1]."""
    rng, colors = np.random.default_rng(0), np.array([[220, 40, 40], [40, 40, 220]])
    labels = np.arange(n) % 2
    images = np.clip(colors[labels][:, None, None] + rng.integers(-20, 21, (n, size, size, 3)), 0, 255)
    np.savez(tmp_path / "two.npz", images=images.astype(np.uint8), labels=labels)
    means = np.stack([np.broadcast_to((c / 127.5 - 1)[:, None, None], (3, size, size)) for c in colors])
    return str(tmp_path / "two.npz"), means.astype(np.float32)


def test_analytic_classifier_guidance_samples_the_target_class(tmp_path):
    """With the exact p(y | x_t), guidance at scale 1 samples p(x | y): every sample lands on its class."""
    schedule = make_schedule(1000)
    _, means = _two_colors(tmp_path)
    eps, grad_fn_for = _mixture(schedule, means, 0.1)
    nearest = lambda x: np.argmin(((x[:, None] - means[None]) ** 2).sum((2, 3, 4)), axis=1)  # noqa: E731
    plain = nearest(sample(eps, (32, 3, 8, 8), schedule, "ddim", 20, seed=1))
    assert 0.2 < plain.mean() < 0.8  # both classes without guidance
    for target in (0, 1):
        fn = make_classifier_guided_model_fn(eps, schedule, grad_fn_for(target), 1.0)
        assert np.all(nearest(sample(fn, (32, 3, 8, 8), schedule, "ddim", 20, seed=1)) == target)


class _GaussianBundle(Bundle):
    """An unconditional 'model' whose data is N(mid, s^2 I), s = 0.5:
    eps* = sqrt(1 - ab) (x - sqrt(ab) mid) / (ab s^2 + 1 - ab)."""

    mid = None

    def model_fn(self, x, t, cond):
        ab = self.schedule.alphas_cumprod[int(t[0])]
        return (math.sqrt(1 - ab) * (x - math.sqrt(ab) * self.mid) / (ab * 0.25 + 1 - ab)).astype(x.dtype)


@pytest.fixture(scope="module")
def two_color_classifier(tmp_path_factory):
    """30 steps on red-vs-blue 8x8 images (T = 1000): a classifier whose gradient knows the color."""
    tmp = tmp_path_factory.mktemp("two")
    data, means = _two_colors(tmp)
    cfg = ClassifierTrainConfig(data=data, out=str(tmp / "run"), preset="tiny", steps=30, batch_size=8, lr=5e-3,
                                warmup_steps=5)
    _quiet(train_classifier, cfg)
    return load_classifier(tmp / "run"), means


@pytest.mark.parametrize("sampler, steps", [
    ("ddpm", 25),
    ("ddim", 10),  # regression: DDIM once clipped x0 without re-deriving eps, reversing guidance
])
def test_trained_classifier_guides_generate_toward_the_target(two_color_classifier, sampler, steps):
    """End to end: generate() with the trained classifier's grad_fn pushes samples of a color-neutral
    Gaussian 'model' toward the target color (mean projection on m_red - m_blue; same noise in every run)."""
    clf, means = two_color_classifier
    bundle = _GaussianBundle({}, clf.config, clf.schedule, "none")
    bundle.mid = means.mean(0)
    direction = (means[0] - means[1]) / np.linalg.norm(means[0] - means[1])
    proj = {}
    for target in (None, 0, 1):
        grad_fn = None
        if target is not None:
            grad_fn = clf.make_grad_fn(clf.targets_for(bundle, None, None, SampleConfig(n=8, class_id=target)))
        x = generate(bundle, None, 8, sampler=sampler, steps=steps, seed=1, grad_fn=grad_fn, classifier_scale=10.0)
        proj[target] = float(np.mean(((x - bundle.mid) * direction).sum((1, 2, 3))))
    # measured (ddpm): none -0.07, red +0.33, blue -0.83; other training seeds give gaps >= 0.16
    assert proj[0] > proj[None] + 0.1 and proj[1] < proj[None] - 0.1, proj


def test_cli_and_bad_training_input(tmp_path):
    data, _ = _two_colors(tmp_path, n=8)
    parser = argparse.ArgumentParser()
    add_classifier_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train-classifier", "--data", data, "--out", str(tmp_path / "cli"), "--preset", "tiny",
                              "--steps", "2", "--batch-size", "2", "--no-hflip"])
    assert args.batch_size == 2 and args.weight_decay == ClassifierTrainConfig.weight_decay
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert args.func(args) == 0
    assert load_classifier(tmp_path / "cli").num_classes == 2
    with pytest.raises(ValueError, match="--lr must be > 0"):
        _quiet(train_classifier, ClassifierTrainConfig(data=data, out=str(tmp_path / "a"), lr=0.0))
    with pytest.raises(ValueError, match="--device must be one of"):
        _quiet(train_classifier, ClassifierTrainConfig(data=data, out=str(tmp_path / "a"), device="tpu"))
    np.savez(tmp_path / "nolabels.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="needs labelled data"):
        _quiet(train_classifier, ClassifierTrainConfig(data=str(tmp_path / "nolabels.npz"), out=str(tmp_path / "b")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing written by a failed start
    save_checkpoint(tmp_path / "diffusion.npz", {"params": {"w": np.zeros(2)}}, {"model_config": {}})
    with pytest.raises(ValueError, match="not a classifier checkpoint"):
        load_classifier(tmp_path / "diffusion.npz")
    arrays, meta = load_checkpoint(tmp_path / "cli" / "checkpoints" / "latest.npz")
    arrays["params"]["head.linear.weight"] = np.zeros((5, 16), np.float32)
    save_checkpoint(tmp_path / "bad.npz", arrays, meta)
    with pytest.raises(ValueError, match="does not match its classifier config"):
        load_classifier(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "missing")


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import minidiff.training.classifier as ct

    data, _ = _two_colors(tmp_path, n=8)
    calls = {"n": 0}

    def forward_nan_at_step_3(*args, **kwargs):
        logits, cache = classifier_forward(*args, **kwargs)
        calls["n"] += 1
        return (logits * np.nan if calls["n"] == 3 else logits), cache

    monkeypatch.setattr(ct, "classifier_forward", forward_nan_at_step_3)
    cfg = ClassifierTrainConfig(data=data, out=str(tmp_path / "run"), preset="tiny", steps=5, batch_size=2,
                                save_every=2)
    with pytest.raises(RuntimeError, match="at step 3"):
        _quiet(train_classifier, cfg)
    _, meta = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.npz")
    assert meta["step"] == 2 and all(math.isfinite(v) for v in meta["losses"])


def test_config_json_and_log_jsonl_are_written_through_a_temporary_file_and_rename(tmp_path, monkeypatch):
    """config.json and log.jsonl go through the run folder's atomic writer (files.write_atomic: <name>.tmp-<pid>,
    fsync, os.replace), as the U-Net trainer's do: a kill in the middle of a write leaves the old file or the
    new one, never a half-written config.json. Every rewrite of log.jsonl holds whole JSON lines only."""
    import os

    data, _ = _two_colors(tmp_path, n=8)
    out, renamed, real_replace = tmp_path / "run", [], os.replace

    def replace(src, dst):
        assert Path(src).name == f"{Path(dst).name}.tmp-{os.getpid()}"
        real_replace(src, dst)
        if Path(dst).suffix in (".json", ".jsonl"):
            renamed.append((Path(dst).name, Path(dst).read_text()))

    monkeypatch.setattr(os, "replace", replace)
    cfg = ClassifierTrainConfig(data=data, out=str(out), preset="tiny", steps=5, batch_size=2, log_every=2)
    _quiet(train_classifier, cfg)
    names = [name for name, _ in renamed]
    assert names[0] == "config.json" and json.loads(renamed[0][1])["kind"] == "classifier"
    logs = [text for name, text in renamed if name == "log.jsonl"]
    assert [[json.loads(line)["step"] for line in text.splitlines()] for text in logs] == [[2], [2, 4], [2, 4, 5]]
    assert (out / "log.jsonl").read_text() == logs[-1] and not [p for p in out.rglob("*") if ".tmp" in p.name]


@pytest.mark.gpu
def test_gpu_training_and_grad_fn(tmp_path):
    """A 2-step run on the GPU, loaded back onto it; its grad_fn returns CuPy arrays."""
    cp = pytest.importorskip("cupy")
    from minidiff.backend import gpu_available

    if not gpu_available():
        pytest.skip("no CUDA device")
    data, _ = _two_colors(tmp_path, n=8)
    cfg = ClassifierTrainConfig(data=data, out=str(tmp_path / "gpu"), preset="tiny", steps=2, batch_size=2,
                                device="gpu")
    assert all(math.isfinite(v) for v in _quiet(train_classifier, cfg)["losses"])
    clf = load_classifier(tmp_path / "gpu", device="gpu")
    x8 = cp.asarray(np.random.default_rng(0).standard_normal((2, 3, 8, 8)), dtype=cp.float32)
    out = clf.make_grad_fn([0, 1])(x8, cp.asarray([10, 900]), None)
    assert isinstance(out, cp.ndarray) and out.shape == x8.shape and bool(cp.isfinite(out).all())
