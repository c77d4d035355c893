"""Sample quality on any labelled data: a clean-data classifier reads the samples (accuracy) and gives the
features of a Fréchet distance to held-out real images (frechet.py). `minidiff eval` (eval_labelled.py) and
`minidiff train --eval-every N` use it.

    held-out  H = the first max(2, min(N // 10, 1000)) images of default_rng(0).permutation(N)   (fixed split)
    classifier: model/classifier.py at t = 0 (no noise), AdamW on softmax cross-entropy over the other images
    accuracy  = 1/M sum_m [argmax logits(x_m) == y_m],   x_m ~ p_s(x | y_m), every class M / K times
    frechet   = d^2(N(mu_H, S_H), N(mu_x, S_x)) of the pooled features f = mean_hw(silu(head.norm(h)))
                (the input of head.linear, (N, Cl)), as FID does with Inception's pool3

Comparable across runs: the classifier is trained once (seed 0, reference ops, its own generator) and saved in
FOLDER (default RUN/eval_classifier; pass one folder to several runs to compare them with the same weights);
its meta names the data's fingerprint (sha256 of the uint8 images and labels), the split and the config; a
saved classifier is reused whatever the config asks, and a folder made for other data is refused, never
retrained over. Its held-out accuracy (how well it
reads real images) and the held-out statistics are stored beside the weights.
Shape legend: N images, C channels, S side, K classes, M samples, Cl feature width.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..data.dataset import caption_of, to_float
from ..model.classifier import classifier_backward, classifier_forward, classifier_init_params
from ..model.config import UNetConfig
from ..nn import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from ..nn.ops import REFERENCE
from .bundle import build_unet_config
from .checkpoint import load_checkpoint, save_checkpoint
from .frechet import feature_stats, frechet_distance
from .generate import generate
from .optim import AdamW, warmup_lr
from .run_meta import check_eval_classifier

CHUNK = 256  # images per classifier call when reading features


@dataclass
class EvalClassifierConfig:
    """The settings of the clean-data classifier that minidiff eval trains once per dataset."""
    preset: str = "small"     # U-Net preset whose encoder the classifier uses
    steps: int = 300          # AdamW steps on clean images
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 30
    seed: int = 0             # weights and batches; the held-out split always uses default_rng(0)


def heldout_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): the held-out set is the first max(2, min(n // 10, 1000)) of a fixed
    permutation (default_rng(0)), n >= 4."""
    perm = np.random.default_rng(0).permutation(n)
    k = max(2, min(n // 10, 1000))
    return perm[k:], np.sort(perm[:k])


def fingerprint(dataset) -> str:
    """sha256 (first 16 hex) of the dataset's uint8 images, shape and labels: which data a classifier saw."""
    h = hashlib.sha256(np.ascontiguousarray(dataset.data).tobytes())
    h.update(repr(dataset.data.shape).encode())
    h.update(np.asarray(dataset.labels, np.int64).tobytes())
    return h.hexdigest()[:16]


@dataclass
class EvalClassifier:
    """The trained eval classifier with its class names and the held-out data's feature statistics."""
    params: dict
    config: UNetConfig
    class_names: list
    mu_real: np.ndarray     # (Cl,) held-out feature mean
    sigma_real: np.ndarray  # (Cl, Cl) held-out feature covariance
    meta: dict

    def read(self, x) -> tuple[np.ndarray, np.ndarray]:
        """(predicted class (N,), features (N, Cl) float64) of images x (N, C, S, S) in [-1, 1], at t = 0."""
        x = np.asarray(to_numpy(x), np.float32)
        preds, feats = [], []
        for i in range(0, len(x), CHUNK):
            logits, cache = classifier_forward(self.params, self.config, x[i:i + CHUNK], 0)
            preds.append(logits.argmax(axis=1))
            feats.append(np.asarray(cache["lin"][0], np.float64))  # head.linear's input: the pooled features
        return np.concatenate(preds), np.concatenate(feats)

    def score(self, x, labels) -> dict:
        """{accuracy: share of x read as its label, frechet: d^2 to the held-out features}."""
        pred, feats = self.read(x)
        mu, sigma = feature_stats(feats)
        return {"accuracy": float(np.mean(pred == np.asarray(labels))),
                "frechet": frechet_distance(mu, sigma, self.mu_real, self.sigma_real)}


def get_eval_classifier(dataset, folder, cfg: EvalClassifierConfig | None = None, log=print) -> EvalClassifier:
    """The classifier saved in folder when it was made for this data and cfg; else train it there (once)."""
    if dataset.infinite or dataset.labels is None or dataset.num_classes < 2 or len(dataset) < 4:
        raise ValueError(f"data {dataset.name!r} has no fixed set of >= 4 labelled images with >= 2 classes to "
                         "train the eval classifier on (the built-in shapes: the pixel checker, evaluate.py)")
    cfg = cfg or EvalClassifierConfig()
    folder = Path(folder)
    ckpt = folder / "checkpoints" / "latest.npz"
    key = {"data": fingerprint(dataset), "n": len(dataset)}  # a saved classifier is used whatever cfg says
    if ckpt.exists():
        arrays, meta = load_checkpoint(ckpt)
        config, names = check_eval_classifier(arrays, meta, ckpt)  # field by field, one line naming a bad one
        if meta["key"] != key:
            raise ValueError(f"the eval classifier in {folder} was trained on other data ({meta['key']} != {key});"
                             " pass another --eval-classifier folder (or delete this one)")
        params = {k: np.asarray(v, np.float32) for k, v in arrays["params"].items()}
        return EvalClassifier(params, config, names, arrays["heldout"]["mu"], arrays["heldout"]["sigma"], meta)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} holds something else than an eval classifier; pass an empty or new folder")
    train_idx, held_idx = heldout_split(len(dataset))
    config = build_unet_config(cfg.preset, dataset, "none")
    K = dataset.num_classes
    params = train_clean_classifier(dataset, train_idx, config, K, cfg, log)
    names = dataset.class_names or [str(k) for k in range(K)]
    clf = EvalClassifier(params, config, names, None, None, {})
    pred, feats = clf.read(to_float(dataset.data[held_idx]))
    clf.mu_real, clf.sigma_real = feature_stats(feats)
    held_acc = float(np.mean(pred == dataset.labels[held_idx]))
    clf.meta = {"kind": "eval_classifier", "key": key, "model_config": config.to_dict(), "class_names": names,
                "heldout_n": int(len(held_idx)), "heldout_accuracy": held_acc, "train_n": int(len(train_idx)),
                "config": dataclasses.asdict(cfg)}
    save_checkpoint(ckpt, {"params": params, "heldout": {"mu": clf.mu_real, "sigma": clf.sigma_real}}, clf.meta)
    log(f"eval classifier: {cfg.steps} steps on {len(train_idx)} clean images, held-out accuracy {held_acc:.1%} "
        f"on {len(held_idx)}; saved in {folder}")
    return clf


def train_clean_classifier(dataset, train_idx, config, K: int, cfg: EvalClassifierConfig, log=print) -> dict:
    """AdamW on L = cross_entropy(classifier(x_0, t = 0), y) over batches drawn from train_idx (host float32)."""
    params = classifier_init_params(config, K, cfg.seed, np.float32)
    opt = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, ops=REFERENCE)
    rng = np.random.default_rng([cfg.seed, 2])  # its own generator: never a training run's
    for step in range(cfg.steps):
        idx = train_idx[rng.integers(0, len(train_idx), cfg.batch_size)]
        logits, cache = classifier_forward(params, config, to_float(dataset.data[idx]), 0)  # (B, K)
        loss, ce = softmax_cross_entropy_forward(logits, dataset.labels[idx])
        grads, _ = classifier_backward(softmax_cross_entropy_backward(1.0, ce), cache)
        REFERENCE.clip_grad_norm(grads, 1.0)
        opt.step(params, grads, lr=warmup_lr(step, cfg.lr, cfg.warmup_steps))
    return params


def sample_and_score(bundle, clf: EvalClassifier, n_per_class: int, scale: float, sampler: str = "ddim",
                     steps: int = 50, seed: int = 1, device: str = "cpu", dtype: str = "float32",
                     karras: bool = False) -> tuple[dict, object, list]:
    """Sample n_per_class images of each class at guidance scale s; (score, images, class ids)."""
    K = len(clf.class_names)
    if bundle.conditioning not in ("class", "text"):
        raise ValueError("eval needs a class- or text-conditioned model (this one is unconditional)")
    if bundle.num_classes != K:
        raise ValueError(f"the model has {bundle.num_classes} classes, the eval data {K}")
    ids = [i % K for i in range(n_per_class * K)]
    prompts = [caption_of(clf.class_names[i]) for i in ids]
    cond = bundle.encode(prompts=prompts, class_ids=ids, n=len(ids))
    x = generate(bundle, cond, len(ids), float(scale), sampler, steps, seed=seed, device=device, dtype=dtype,
                 karras=karras)
    return clf.score(x, ids), x, ids


def eval_during_training(trainer) -> dict:
    """--eval-every: eval_accuracy (and eval_frechet, labelled data) of a few EMA samples of a Trainer (shapes: the
    pixel checker). Its draws come from seed 1 and the classifier's own generator, never the trainer's rng."""
    cfg, b = trainer.cfg, trainer.bundle()
    if trainer.dataset.infinite:  # the built-in shapes: the pixel checker reads each sample
        from ..data import shapes

        n = cfg.eval_n_per_class * shapes.NUM_CLASSES
        prompts = [shapes.CLASS_NAMES[i % shapes.NUM_CLASSES] for i in range(n)]
        cond = b.encode(prompts=prompts, class_ids=[i % shapes.NUM_CLASSES for i in range(n)], n=n)
        x = generate(b, cond, n, cfg.guidance_scale, "ddim", cfg.sample_steps, seed=1, device=cfg.device,
                     dtype=cfg.dtype)
        return {"eval_accuracy": shapes.prompt_accuracy(x, prompts)}
    folder = cfg.eval_classifier or trainer.out / "eval_classifier"
    clf = get_eval_classifier(trainer.dataset, folder, EvalClassifierConfig(steps=cfg.eval_classifier_steps),
                              trainer.log)
    score = sample_and_score(b, clf, cfg.eval_n_per_class, cfg.guidance_scale, "ddim", cfg.sample_steps, 1,
                             cfg.device, cfg.dtype)[0]
    return {"eval_accuracy": score["accuracy"], "eval_frechet": score["frechet"],
            "eval_heldout_accuracy": clf.meta["heldout_accuracy"]}
