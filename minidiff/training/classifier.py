"""Training the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4.1), and
its `minidiff train-classifier` command (the model is in model/classifier.py), and load_classifier, which
turns a checkpoint into the Classifier that guides sampling.

    repeat:
        x_0, y ~ data;  t ~ U{0, ..., T-1},  eps ~ N(0, I)
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps                    (add_noise)
        L = -1/B sum_n log_softmax(classifier(x_t, t))[n, y_n]          (softmax cross-entropy)
        theta <- AdamW(theta, clip(grad L))

Every random draw comes from one host generator seeded with --seed (data, flips, t, eps, dropout).
Run directory: config.json, log.jsonl ({step, loss, accuracy}), checkpoints/latest.npz with
meta {kind: "classifier", model_config, num_classes, class_names, train_config, step, losses, accuracies}.
Shape legend: B batch, C channels, S image side, K classes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import to_device, to_numpy, xp_for
from .bundle import build_unet_config, resolve_checkpoint
from .checkpoint import load_checkpoint, save_checkpoint
from .run_folder import write_atomic
from .run_meta import check_classifier_meta
from ..model.classifier import (classifier_backward, classifier_forward, classifier_init_params,
                                classifier_param_shapes, log_prob_grad)
from ..model.config import UNetConfig
from .config import add_dataclass_args, dataclass_from_args
from ..data import load_dataset
from ..data.dataset import caption_of
from ..diffusion.loss import sample_timesteps
from ..nn import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from ..nn._check import check_indices, check_ndim
from ..nn.cross_entropy import log_softmax
from ..nn.ops import REFERENCE
from .optim import AdamW, warmup_lr
from .report import ProgressBar
from ..diffusion.schedule import add_noise, check_choice, make_schedule
from .trainer import TrainingDiverged


@dataclass
class ClassifierTrainConfig:
    """Every option of `minidiff train-classifier` (one flag per field)."""
    # --- data and model ---
    data: str = "shapes16"           # built-in name or a path, as for `minidiff train`; must have class labels
    out: str = "runs/classifier16"   # run directory: config.json, log.jsonl, checkpoints/latest.npz
    preset: str = "small"            # U-Net preset whose down path + mid block the classifier uses: tiny, small, ...
    # --- diffusion (use the settings of the diffusion model it will guide) ---
    num_train_timesteps: int = 1000  # T; the classifier sees x_t for t ~ U{0..T-1}
    beta_schedule: str = "linear"    # linear, scaled_linear, squaredcos_cap_v2, sigmoid
    # --- optimisation (AdamW, linear warm-up, global-norm clipping) ---
    steps: int = 600                 # optimizer steps in total
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05       # AdamW decoupled decay (guided-diffusion's classifiers: 0.05)
    warmup_steps: int = 50           # linear learning-rate warm-up
    grad_clip: float = 1.0           # global-norm clip; 0 = off
    hflip: bool = False              # random horizontal flips
    # --- checkpoints, logging, run ---
    save_every: int = 200            # checkpoint every N steps (and at the end)
    log_every: int = 10              # JSONL log line every N steps
    seed: int = 0
    device: str = "cpu"              # cpu | gpu (CuPy)
    dtype: str = "float32"           # float32 | float64


def validate_classifier_config(cfg: ClassifierTrainConfig) -> None:
    """Clear errors for bad options, each naming the flag."""
    check_choice("--device", cfg.device, {"cpu", "gpu"})
    check_choice("--dtype", cfg.dtype, {"float32", "float64"})
    for name in ("steps", "batch_size", "save_every", "log_every", "num_train_timesteps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "grad_clip", "weight_decay"):
        if not getattr(cfg, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")


def train_classifier(cfg: ClassifierTrainConfig, log=print, ops=REFERENCE) -> dict:
    """Train on noised data (module docstring); write OUT/config.json, log.jsonl, checkpoints/latest.npz.
    ops holds the parameters and runs AdamW (the command line passes the fast table: one flat buffer)."""
    validate_classifier_config(cfg)
    out = Path(cfg.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} already holds something; choose a new --out (nothing was "
                              "overwritten)")
    xp, dtype = xp_for(cfg.device), np.dtype(cfg.dtype)
    dataset = load_dataset(cfg.data)
    K = dataset.num_classes
    if K < 2:
        raise ValueError(f"data {dataset.name!r} has {K} classes; train-classifier needs labelled data with >= 2")
    config = build_unet_config(cfg.preset, dataset, "none")
    schedule = make_schedule(cfg.num_train_timesteps, cfg.beta_schedule)
    params = ops.arrange_params(to_device(classifier_init_params(config, K, cfg.seed, dtype), cfg.device))
    opt = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, ops=ops)
    rng = np.random.default_rng(cfg.seed)  # every draw of the run: data, flips, t, eps, dropout
    meta = {"kind": "classifier", "model_config": config.to_dict(), "num_classes": K,
            "class_names": dataset.class_names, "train_config": dataclasses.asdict(cfg)}
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(meta, indent=2).encode())  # as the U-Net's run folder: never half
    ckpt, losses, accs, log_lines = out / "checkpoints" / "latest.npz", [], [], []
    pending = []  # (loss, accuracy) 0-d device arrays of the steps not read yet
    flush_every = 1 if xp is np else cfg.log_every  # host reads: free on a CPU, a sync on a GPU

    def flush(step: int) -> None:
        """Read the pending losses and accuracies to the host in one copy; stop on the first bad loss."""
        if pending:
            values = xp.stack([v for pair in pending for v in pair]).astype(np.float64).tolist()
            first = step - len(pending) + 1
            pending.clear()
            for i, loss in enumerate(values[0::2]):
                if not math.isfinite(loss):
                    raise TrainingDiverged(f"loss became {loss} at step {first + i}; training stopped, the last "
                                           f"good checkpoint ({ckpt}, if one was saved) is kept. Try a lower --lr "
                                           "or --grad-clip")
            losses.extend(values[0::2])
            accs.extend(values[1::2])

    log(f"minidiff train-classifier: {dataset.name} ({K} classes), preset {cfg.preset}, "
        f"{sum(int(v.size) for v in params.values()):,} params, {cfg.device} {cfg.dtype}, {cfg.steps} steps")
    bar, bar_step = ProgressBar(cfg.steps), 0
    for step in range(1, cfg.steps + 1):
        x0, labels, _ = dataset.batch(rng, cfg.batch_size)  # (B, C, S, S), (B,)
        if cfg.hflip:
            x0 = np.where((rng.random(cfg.batch_size) < 0.5)[:, None, None, None], x0[..., ::-1], x0)
        t = sample_timesteps(rng, cfg.batch_size, cfg.num_train_timesteps)  # (B,) t ~ U{0..T-1}
        noise = rng.standard_normal(x0.shape)  # eps ~ N(0, I), drawn on the host
        x_t = add_noise(schedule, xp.asarray(x0, dtype=dtype), xp.asarray(noise, dtype=dtype), t)
        check_indices("labels", labels, K)  # on the host, before the copy: no read back
        y = xp.asarray(labels)
        logits, cache = classifier_forward(params, config, x_t, t, train=True, rng=rng, ops=ops)
        loss, ce = softmax_cross_entropy_forward(logits, y, check_labels=False)
        pending.append((loss, (logits.argmax(axis=1) == y).mean()))  # read by flush()
        grads, _ = classifier_backward(softmax_cross_entropy_backward(1.0, ce), cache)
        if cfg.grad_clip > 0:
            ops.clip_grad_norm(grads, cfg.grad_clip)
        opt.step(params, grads, lr=warmup_lr(step - 1, cfg.lr, cfg.warmup_steps))
        if step % flush_every == 0 or step % cfg.log_every == 0 or step % cfg.save_every == 0 \
                or step == cfg.steps:
            flush(step)
            bar.update(step, cfg.batch_size * (step - bar_step), loss=losses[-1], acc=accs[-1])
            bar_step = step
        if step % cfg.log_every == 0 or step == cfg.steps:
            log_lines.append(json.dumps({"step": step, "loss": losses[-1], "accuracy": accs[-1]}) + "\n")
            write_atomic(out / "log.jsonl", "".join(log_lines).encode())  # whole lines only, even when killed
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt, {"params": params}, meta | {"step": step, "losses": losses, "accuracies": accs})
    bar.close()
    k = max(1, min(50, len(losses) // 5))
    log(f"done: {cfg.steps} steps, loss {np.mean(losses[-k:]):.4f}, accuracy {np.mean(accs[-k:]):.3f} (mean of the "
        f"last {k}, noisy x_t); checkpoint {ckpt}, log {out / 'log.jsonl'}")
    return {"steps": cfg.steps, "out": str(out), "checkpoint": str(ckpt), "losses": losses, "accuracies": accs,
            "final_loss": float(np.mean(losses[-k:])), "final_accuracy": float(np.mean(accs[-k:]))}


def cmd_train_classifier(args) -> int:
    train_classifier(dataclass_from_args(ClassifierTrainConfig, args))
    return 0


def add_classifier_parser(subparsers) -> argparse.ArgumentParser:
    """Register `minidiff train-classifier`, its flags generated from ClassifierTrainConfig."""
    p = subparsers.add_parser("train-classifier", help="train a noise-aware classifier for `sample --classifier`",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(p, ClassifierTrainConfig)
    p.set_defaults(func=cmd_train_classifier)
    return p


@dataclass
class Classifier:
    """A trained classifier on one device, ready to guide sampling (load_classifier builds it)."""

    params: dict
    config: UNetConfig
    num_classes: int
    class_names: list | None
    schedule: object  # the schedule it was trained with: guidance must use the same abar_t
    device: str = "cpu"

    def log_probs(self, x_t, t):
        """log p(k | x_t, t), (N, K)."""
        return log_softmax(classifier_forward(self.params, self.config, x_t, t)[0], axis=1)

    def make_grad_fn(self, labels):
        """grad_fn(x_t, t, y) -> grad_x log p(labels | x_t) for classifier_guided_eps; y is ignored (the model's
        condition, e.g. token ids), the host labels (N,) in [0, K) are moved to the device once."""
        host = np.asarray(labels)
        check_ndim("labels", host, 1, "(N,)")
        check_indices("labels", host, self.num_classes)
        y = to_device(host.astype(np.int64), self.device)
        dtype = self.params["head.linear.weight"].dtype

        def grad_fn(x_t, t, y_ignored=None):
            if x_t.shape[0] != host.shape[0]:
                raise ValueError(f"x_t holds {x_t.shape[0]} samples but the classifier got {host.shape[0]} labels")
            return log_prob_grad(self.params, self.config, x_t.astype(dtype, copy=False), t, y).astype(x_t.dtype)
        return grad_fn

    def check_compatible(self, bundle) -> None:
        """Raise ValueError unless bundle makes images of this classifier's size and uses its schedule."""
        c, b, s = self.config, bundle.config, bundle.schedule
        if (c.sample_size, c.in_channels) != (b.sample_size, b.in_channels):
            raise ValueError(f"the classifier reads {c.sample_size}x{c.sample_size} images with {c.in_channels} "
                             f"channels, the diffusion model makes {b.sample_size}x{b.sample_size} with "
                             f"{b.in_channels}")
        if len(s) != len(self.schedule) or not np.allclose(s.alphas_cumprod, self.schedule.alphas_cumprod):
            raise ValueError(f"the classifier was trained with num_train_timesteps={len(self.schedule)}, beta_schedule="
                             f"{self.schedule.beta_schedule!r}, the diffusion model uses {len(s)}, {s.beta_schedule!r};"
                             " train the classifier with the model's --num-train-timesteps and --beta-schedule")

    def class_of_prompt(self, prompt: str) -> int:
        """The class whose name's words all occur in the prompt (the one with the most words wins)."""
        words, names = set(str(prompt).lower().split()), self.class_names or [str(k) for k in range(self.num_classes)]
        hits = [(len(set(caption_of(nm).split())), k) for k, nm in enumerate(names)
                if caption_of(nm) and set(caption_of(nm).split()) <= words]
        best = [k for n, k in hits if n == max(hits)[0]] if hits else []
        if len(best) != 1:
            why = "names no class" if not best else f"matches classes {[names[k] for k in best]} equally"
            raise ValueError(f"prompt {prompt!r} {why} of the classifier; a prompt must contain every word of one "
                             f"class name: {', '.join(names)}")
        return best[0]

    def targets_for(self, bundle, cond, labels, sample_cfg):
        """int64 (n,) target classes: a class model's class ids (cond), a text model's prompts (labels) mapped
        by class_of_prompt, or sample_cfg.class_id for an unconditional model."""
        self.check_compatible(bundle)
        if bundle.conditioning == "class":
            names = bundle.class_names
            if names and self.class_names and list(names) != list(self.class_names):
                raise ValueError(f"the model's classes {names} differ from the classifier's {self.class_names}")
            targets = np.asarray(to_numpy(cond)).astype(np.int64).reshape(-1)
        elif bundle.conditioning == "text":
            if labels is None:
                raise ValueError("labels must hold the prompts of a text-conditioned model, got None")
            targets = np.array([self.class_of_prompt(p) for p in labels], np.int64)
        elif sample_cfg.class_id < 0:
            raise ValueError(f"the diffusion model is unconditional: pass --class ID (0..{self.num_classes - 1}) to "
                             "name the class the classifier should guide toward")
        else:
            targets = np.full(sample_cfg.n, sample_cfg.class_id, np.int64)
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.size:
            raise ValueError(f"--class must be in [0, {self.num_classes}) for this classifier, got {bad[0]}")
        return targets


def load_classifier(path, device: str = "cpu", dtype: str = "float32") -> Classifier:
    """Load a train-classifier run directory or checkpoint .npz onto device, in dtype."""
    check_choice("dtype", dtype, {"float32", "float64"})
    p = resolve_checkpoint(path)
    arrays, meta = load_checkpoint(p)
    if meta.get("kind") != "classifier":
        raise ValueError(f"{str(p)!r} is not a classifier checkpoint; pass one written by minidiff train-classifier")
    config, K = check_classifier_meta(meta, p)  # each field read below, one line naming it if bad
    shapes, src = classifier_param_shapes(config, K), arrays.get("params", {})
    bad = sorted(k for k in set(shapes) | set(src) if k not in src or k not in shapes or src[k].shape != shapes[k])
    if bad:
        raise ValueError(f"checkpoint {str(p)!r} does not match its classifier config (first bad key {bad[0]!r})")
    params = {k: to_device(np.asarray(src[k], dtype=dtype), device) for k in shapes}
    t = meta["train_config"]
    return Classifier(params, config, K, meta.get("class_names"),
                      make_schedule(t["num_train_timesteps"], t["beta_schedule"]), device)
