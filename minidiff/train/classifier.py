"""Training the noise-aware classifier of classifier guidance (Dhariwal & Nichol 2021, sec. 4.1), and
its `minidiff train-classifier` command (the model is in classifier.py).

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

from ..fast import flat
from ..backend import to_device, xp_for
from .bundle import build_unet_config
from .checkpoint import save_checkpoint
from ..model.classifier import classifier_backward, classifier_forward, classifier_init_params
from .config import add_dataclass_args, dataclass_from_args
from ..data import load_dataset
from ..diffusion.loss import sample_timesteps
from ..nn import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from ..nn._check import check_indices
from .optim import AdamW, clip_grad_norm, warmup_lr
from .report import ProgressBar
from ..diffusion.schedule import add_noise, check_choice, make_schedule
from .trainer import TrainingDiverged


@dataclass
class ClassifierTrainConfig:
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


def train_classifier(cfg: ClassifierTrainConfig, log=print) -> dict:
    """Train on noised data (module docstring); write OUT/config.json, log.jsonl, checkpoints/latest.npz."""
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
    params = flat.flatten(to_device(classifier_init_params(config, K, cfg.seed, dtype), cfg.device))  # one buffer
    opt = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)  # every draw of the run: data, flips, t, eps, dropout
    meta = {"kind": "classifier", "model_config": config.to_dict(), "num_classes": K,
            "class_names": dataset.class_names, "train_config": dataclasses.asdict(cfg)}
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(meta, indent=2))
    ckpt, losses, accs = out / "checkpoints" / "latest.npz", [], []
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
    with open(out / "log.jsonl", "w") as logf:
        for step in range(1, cfg.steps + 1):
            x0, labels, _ = dataset.batch(rng, cfg.batch_size)  # (B, C, S, S), (B,)
            if cfg.hflip:
                x0 = np.where((rng.random(cfg.batch_size) < 0.5)[:, None, None, None], x0[..., ::-1], x0)
            t = sample_timesteps(rng, cfg.batch_size, cfg.num_train_timesteps)  # (B,) t ~ U{0..T-1}
            noise = rng.standard_normal(x0.shape)  # eps ~ N(0, I), drawn on the host
            x_t = add_noise(schedule, xp.asarray(x0, dtype=dtype), xp.asarray(noise, dtype=dtype), t)
            check_indices("labels", labels, K)  # on the host, before the copy: no read back
            y = xp.asarray(labels)
            logits, cache = classifier_forward(params, config, x_t, t, train=True, rng=rng)
            loss, ce = softmax_cross_entropy_forward(logits, y, check_labels=False)
            pending.append((loss, (logits.argmax(axis=1) == y).mean()))  # read by flush()
            grads, _ = classifier_backward(softmax_cross_entropy_backward(1.0, ce), cache)
            grads = flat.gather(grads, like=params)  # one buffer: clipping and AdamW act on it whole
            if cfg.grad_clip > 0:
                clip_grad_norm(grads, cfg.grad_clip)
            opt.step(params, grads, lr=warmup_lr(step - 1, cfg.lr, cfg.warmup_steps))
            if step % flush_every == 0 or step % cfg.log_every == 0 or step % cfg.save_every == 0 \
                    or step == cfg.steps:
                flush(step)
                bar.update(step, cfg.batch_size * (step - bar_step), loss=losses[-1], acc=accs[-1])
                bar_step = step
            if step % cfg.log_every == 0 or step == cfg.steps:
                logf.write(json.dumps({"step": step, "loss": losses[-1], "accuracy": accs[-1]}) + "\n")
                logf.flush()
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
