"""The training loop of DDPM (Ho et al. 2020, Algorithm 1) with condition dropout for CFG.

    1: repeat
    2:     x_0 ~ q(x_0), c ~ data;  c = null with probability p_uncond     (Ho & Salimans 2022, Alg. 1)
    3:     t ~ Uniform({1, ..., T})                                          (here 0-based: {0, ..., T-1})
    4:     eps ~ N(0, I)
    5:     gradient step on grad_theta || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c) ||^2
           (AdamW on the clipped gradient; then the EMA of theta, which sampling uses)
    6: until converged

Every random draw of a step comes from ONE host generator (data, flips, dropout of conditions,
t, eps, network dropout), whose state is saved in each checkpoint, so an interrupted and
resumed run repeats the uninterrupted run's losses exactly.

The ops table (nn/ops.py) passed in picks who runs each op: REFERENCE (nn/, the default) or the
fast table the command line builds. Its map_batch runs loss_and_grads on the batch: whole, or split
by rows over the CPU cores with the pieces' losses and gradients summed (fast/cpu/shards.py).

With --gradient-accumulation-steps K the batch of line 2 has K B rows and line 5's gradient is the
mean over K micro-batches of B rows (accumulate.py): the same step as one batch of K B rows.

Run directory (run_folder.py): config.json, log.jsonl, loss.png, samples/step_XXXXXX.png (previews.py) and
checkpoints/latest.npz (run_state.py: saved behind a NaN guard; --resume checks it field by field).
Shape legend: B batch, C channels, S image side, L prompt tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ..backend import set_tf32, to_device, xp_for
from .bundle import Bundle, build_unet_config, choose_conditioning
from .accumulate import accumulate
from .run_folder import (check_run_dir, lock_run_dir, ops_record, prepare_run_dir, remove_unused_run_dir,
                         write_atomic)
from .run_state import TrainingDiverged, restore_state, save_state
from .config import TrainConfig, resolve_device, validate_train_config
from ..data import load_dataset
from ..data.tokenizer import Tokenizer
from ..diffusion.loss import diffusion_loss, drop_condition, hybrid_loss, sample_timesteps
from .optim import EMA, Adam, AdamW, lr_at
from .previews import preview_grid, trainer_bundle
from .run_loop import run_loop
from ..diffusion.schedule import add_noise, make_schedule
from ..model.dropout import draw_dropout_masks
from ..model.unet import init_params, unet_backward, unet_forward
from ..nn.ops import REFERENCE

IN_MEMORY = "<arrays>"  # cfg.data of a run trained on arrays passed in memory (train(cfg, data=...))


def make_condition(rng, conditioning, labels, captions, tokenizer, num_classes, p_uncond):
    """The batch's condition array (host) after condition dropout, or None."""
    if conditioning == "text":
        ids = tokenizer.encode(captions)  # (B, L)
        return drop_condition(rng, ids, np.zeros(ids.shape[1], np.int64), p_uncond)[1]
    if conditioning == "class":
        return drop_condition(rng, labels, np.int64(num_classes), p_uncond)[1]  # null class = num_classes
    return None


class Trainer:
    """Holds the state of one run: data, model, optimizer, EMA, rng, step and losses; ops runs the ops."""

    def __init__(self, cfg: TrainConfig, log=print, ops=REFERENCE, data=None):
        validate_train_config(cfg)
        cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
        if data is not None and not isinstance(data, (str, Path)):  # in-memory arrays: recorded as "<arrays>"
            cfg = dataclasses.replace(cfg, data=IN_MEMORY)
        self.dataset = load_dataset(cfg.data if data is None else data, None if cfg.resolution == -1 else
                                    cfg.resolution, cfg.random_crop, cfg.seed)
        self.rows = cfg.batch_size * cfg.gradient_accumulation_steps  # images per optimizer step
        if cfg.epochs > 0:
            if self.dataset.infinite:
                raise ValueError(f"--epochs needs a finite dataset, and {self.dataset.name} is drawn fresh every "
                                 "batch; use --steps")
            cfg = dataclasses.replace(cfg, steps=max(1, math.ceil(cfg.epochs * len(self.dataset) / self.rows)))
        self.cfg, self.log, self.ops = cfg, log, ops
        self.xp = xp_for(cfg.device)
        if cfg.tf32:
            set_tf32(True)  # for the rest of the process: every float32 matmul on the GPU
        self.dtype = np.dtype(cfg.dtype)
        out = check_run_dir(cfg)  # a refused start makes nothing
        made = not out.exists()
        self.lock = lock_run_dir(out)  # one writer per run folder
        try:
            self.out = prepare_run_dir(cfg)
            self._build(cfg, ops)
        except BaseException:  # the lock is released at once, not when this half-built object is collected
            self.close()
            if made:  # a new folder that failed to start: remove what it got (the lock, empty folders)
                remove_unused_run_dir(out)
            raise

    def _build(self, cfg: TrainConfig, ops) -> None:
        """The model, optimizer, EMA and rng of a new run, or those of its checkpoint with --resume."""
        self.conditioning = choose_conditioning(cfg.conditioning, self.dataset)
        if cfg.eval_every and (self.conditioning == "none" or not self.dataset.num_classes):
            raise ValueError("--eval-every needs a class- or text-conditioned run on labelled data")
        self.tokenizer = None
        if self.conditioning == "text":
            self.tokenizer = Tokenizer.from_captions(self.dataset.all_captions, cfg.max_prompt_len)
        vocab = self.tokenizer.vocab_size if self.tokenizer else 0
        self.model_config = build_unet_config(cfg.preset, self.dataset, self.conditioning, vocab, cfg.dropout)
        if cfg.variance_type == "learned_range":  # C more outputs: the variance v (diffusers' learned_range)
            self.model_config = dataclasses.replace(self.model_config, out_channels=2 * self.dataset.channels)
        self.schedule = make_schedule(cfg.num_train_timesteps, cfg.beta_schedule)
        host = init_params(self.model_config, seed=cfg.seed, dtype=self.dtype)
        self.params = ops.arrange_params(to_device(host, cfg.device))  # FAST: one buffer, updated whole
        opt_cls = AdamW if cfg.optimizer == "adamw" else Adam
        self.opt = opt_cls(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay, ops=ops)
        self.ema = EMA(self.params, cfg.ema_decay, cfg.ema_warmup, ops=ops)
        self.rng = np.random.default_rng(cfg.seed)
        self.step, self.losses, self.pending = 0, [], []
        self.flush_every = 1 if self.xp is np else cfg.log_every  # host reads: free on a CPU, a sync on a GPU
        if cfg.resume:  # checked field by field; log.jsonl trimmed to its step; a line if the ops differ
            restore_state(self, self.out / "checkpoints" / "latest.npz")
        # this start's settings (a resume's: its ops and steps, as its checkpoints will record)
        write_atomic(self.out / "config.json", json.dumps(self.meta(), indent=2).encode())

    # ------------------------------------------------------------------ checkpoints
    def meta(self) -> dict:
        """JSON metadata of the run: both configs, conditioning, classes, the tokenizer, and the ops record
        (run_folder.ops_record: the ops table's name, CPU shard count and device, which decide a step's bits)."""
        return {"train_config": dataclasses.asdict(self.cfg), "model_config": self.model_config.to_dict(),
                "conditioning": self.conditioning, "num_classes": self.dataset.num_classes,
                "class_names": self.dataset.class_names,
                "tokenizer": self.tokenizer.to_dict() if self.tokenizer else None, "ops": ops_record(self.ops, gpu=self.xp is not np)}

    def save(self) -> Path:
        """Write checkpoints/latest.npz atomically, never weights that are not finite (run_state.save_state)."""
        return save_state(self)

    def close(self) -> None:
        """Release the run folder's lock (also released when the process ends)."""
        if getattr(self, "lock", None) is not None:
            self.lock.close()
            self.lock = None

    # ------------------------------------------------------------------ one step
    def train_step(self):
        """One optimizer step of Algorithm 1 (numbers: its lines); returns the loss, a 0-d array on the device.

        Nothing is read back to the host here: the loss waits in self.pending until flush_losses()
        (every step on a CPU, every log_every steps on a GPU, and always before a checkpoint)."""
        cfg, rng, xp = self.cfg, self.rng, self.xp
        x0, cond = self.draw_data(rng)                                               # 2: x0 ~ q(x0), c
        t = sample_timesteps(rng, self.rows, cfg.num_train_timesteps)               # 3: t ~ U, (B,) host
        eps = rng.standard_normal(x0.shape)                                         # 4: eps ~ N(0, I)
        masks = None                                      # the network's dropout: drawn here, after eps
        if self.model_config.dropout > 0:
            masks = draw_dropout_masks(self.model_config, rng, x0.shape, xp)
        batch = dict(x0=xp.asarray(x0, self.dtype), eps=xp.asarray(eps, self.dtype), t=t,
                     class_labels=cond if self.conditioning == "class" else None,
                     context=cond if self.conditioning == "text" else None, dropout_masks=masks)
        loss, grads = accumulate(self.ops.map_batch, loss_and_grads, batch, cfg.gradient_accumulation_steps,
                                 self.rows, params=self.params, config=self.model_config, schedule=self.schedule,
                                 prediction_type=cfg.prediction_type, snr_gamma=cfg.snr_gamma or None,
                                 ops=self.ops, **learned_variance_args(cfg))  # 5: L, grad_theta L (K pieces)
        if cfg.grad_clip > 0:
            self.ops.clip_grad_norm(grads, cfg.grad_clip)                          # 5: clip the gradient
        self.opt.step(self.params, grads, lr=self.lr(self.step))                   # 5: the step
        self.ema.update(self.params)                                      # 5: ema <- EMA(theta), for sampling
        self.step += 1
        self.pending.append(loss)
        return loss

    def lr(self, step: int) -> float:
        """The learning rate of update number step (0-based): warm-up, then --lr-schedule (optim.lr_at)."""
        cfg = self.cfg
        return lr_at(step, cfg.lr, cfg.warmup_steps, cfg.lr_schedule, cfg.steps)

    def draw_data(self, rng):
        """x0 (B, C, S, S) from the data (flipped at random with --hflip) and its condition after
        condition dropout (host arrays), drawn from rng in that order."""
        cfg = self.cfg
        x0, labels, captions = self.dataset.batch(rng, self.rows)                   # (B, C, S, S)
        if cfg.hflip:
            flip = rng.random(self.rows) < 0.5
            x0 = np.where(flip[:, None, None, None], x0[..., ::-1], x0)
        cond = make_condition(rng, self.conditioning, labels, captions, self.tokenizer,
                              self.dataset.num_classes, cfg.p_uncond)
        return x0, cond

    def flush_losses(self) -> float | None:
        """Read the losses of the steps since the last flush to the host (one device -> host copy) and
        stop on the first that is not finite. Returns the newest loss (None before any step)."""
        if self.pending:
            losses = self.xp.stack(self.pending).astype(np.float64).tolist()
            first = self.step - len(losses) + 1
            self.pending = []
            for i, loss in enumerate(losses):
                if not math.isfinite(loss):
                    raise TrainingDiverged(
                        f"loss became {loss} at step {first + i}; training stopped, the last good checkpoint "
                        f"({self.out / 'checkpoints' / 'latest.npz'}) is kept. Try a lower --lr or --grad-clip")
            self.losses.extend(losses)
        return self.losses[-1] if self.losses else None

    # ------------------------------------------------------------------ pictures
    def bundle(self, use_ema: bool = True) -> Bundle:
        """The model as a Bundle for sampling (EMA weights by default; shares the arrays): previews.py."""
        return trainer_bundle(self, use_ema)

    def sample_grid(self, n: int = 18) -> Path:
        """Save samples/step_XXXXXX.png (n EMA samples, captioned) and redraw loss.png: previews.py."""
        return preview_grid(self, n)

    # ------------------------------------------------------------------ the loop
    def run(self, stop_after: int | None = None) -> dict:
        """Train until cfg.steps (or stop_after more steps, to simulate an interruption), logging, saving and
        previewing every N steps (run_loop.py); the run folder's lock is held from __init__ (taken again here if
        released) until run returns."""
        if getattr(self, "lock", None) is None:
            self.lock = lock_run_dir(self.out)
        try:
            return run_loop(self, stop_after)
        finally:
            self.close()


def learned_variance_args(cfg: TrainConfig) -> dict:
    """loss_and_grads's extra options for --variance-type learned_range; none otherwise (the default call)."""
    if cfg.variance_type != "learned_range":
        return {}
    return {"variance_type": cfg.variance_type, "vlb_weight": cfg.vlb_weight}


def loss_and_grads(batch: dict, params, config, schedule, prediction_type="epsilon", snr_gamma=None,
                   ops=REFERENCE, variance_type=None, vlb_weight=0.0):
    """L = || eps - eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c) ||^2 and dL/dtheta (Alg. 1 line 5).

    batch: x0, eps (N, C, H, W); t (N,) host ints; class_labels (N,) or None; context (N, L) or None;
    dropout_masks {resnet prefix: (N, C_out, H_i, W_i) keep-mask} or None. The target is eps, x_0 or v
    (prediction_type), weighted by min-SNR-gamma when snr_gamma is set (diffusion/loss.py). With variance_type
    'learned_range' the U-Net has 2C outputs and the loss is L_simple + vlb_weight L_vlb (loss.hybrid_loss).
    Returns (loss 0-d, grads {key: dL/dparam} under params' keys). ops.map_batch runs it on the whole batch
    or on its rows, so it is a module-level function: worker processes import it by name.
    """
    x0, eps, t = batch["x0"], batch["eps"], batch["t"]
    x_t = add_noise(schedule, x0, eps, t)                               # 5: sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
    out, cache = unet_forward(params, config, x_t, t, batch["class_labels"], batch["context"], train=True,
                              dropout_masks=batch["dropout_masks"], ops=ops)  # 5: eps_theta(x_t, t, c)
    if variance_type is None:
        loss, dout = diffusion_loss(schedule, out, x0, eps, t, prediction_type, snr_gamma)  # 5: || eps - eps_theta ||^2
    else:                                                  # 5: || eps - eps_theta ||^2 + lambda L_vlb(sigma_theta)
        loss, dout = hybrid_loss(schedule, out, x0, eps, t, variance_type, prediction_type, vlb_weight, snr_gamma)
    grads, _ = unet_backward(dout, cache)                               # 5: grad_theta
    return loss, grads


def train(cfg: TrainConfig, stop_after: int | None = None, log=print, ops=REFERENCE, data=None) -> dict:
    """Run (or resume) training with the ops table ops; print a one-line summary of where the files are.

    data: instead of cfg.data, a path, or arrays in memory: {"images": x, "labels": y, "class_names": names}
    (labels and names optional) or the images alone, in the layouts of an .npz (data/npz.py)."""
    trainer = Trainer(cfg, log, ops, data)
    try:
        summary = trainer.run(stop_after)
    finally:
        trainer.close()
    out = trainer.out
    log(f"done: {summary['steps']} steps in {summary['seconds']:.0f}s, final loss {summary['final_loss']:.4f}; "
        f"checkpoint {out / 'checkpoints' / 'latest.npz'}, samples {out / 'samples'}, "
        f"log {out / 'log.jsonl'}, loss curve {out / 'loss.png'}")
    return summary | {"out": str(out), "losses": trainer.losses}
