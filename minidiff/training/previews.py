"""What a run shows while it trains: its model as a Bundle, and the captioned preview grid with the loss curve.

    RUN/samples/step_XXXXXX.png   n EMA samples (DDIM, --sample-steps, CFG scale --guidance-scale, seed --seed)
    RUN/loss.png                  the loss so far (report.save_loss_curve)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import write_atomic
from .bundle import Bundle
from .generate import generate
from .report import save_grid, save_loss_curve


def trainer_bundle(tr, use_ema: bool = True) -> Bundle:
    """Trainer tr's model as a Bundle for sampling (EMA weights by default; shares the arrays, no copy)."""
    b = Bundle(tr.ema.shadow if use_ema else tr.params, tr.model_config, tr.schedule, tr.conditioning,
               tr.cfg.prediction_type, tr.tokenizer, tr.dataset.num_classes, tr.dataset.class_names,
               tr.dataset.image_size, ops=tr.ops)
    if tr.cfg.variance_type != "fixed_small":  # DDPM sampling with the trained (or fixed_large) variance
        b.sampler_options = {"variance_type": tr.cfg.variance_type}
    return b


def preview_grid(tr, n: int = 18) -> Path:
    """Save samples/step_XXXXXX.png: n EMA samples of Trainer tr, captioned; redraw loss.png."""
    b = tr.bundle()
    labels = b.default_prompts(n)
    cond = b.encode(prompts=labels, class_ids=labels if b.conditioning == "class" else None, n=n)
    x = generate(b, cond, n, tr.cfg.guidance_scale, "ddim", tr.cfg.sample_steps, seed=tr.cfg.seed,
                 device=tr.cfg.device, dtype=tr.cfg.dtype)
    path = tr.out / "samples" / f"step_{tr.step:06d}.png"
    names = b.class_names or [str(i) for i in range(b.num_classes)]
    captions = [names[i] if b.conditioning == "class" else str(i) for i in labels]
    write_atomic(path, lambda f: save_grid(x, f, labels=captions, ncol=9))
    save_loss_png(tr)
    return path


def save_loss_png(tr) -> Path:
    """Redraw RUN/loss.png from Trainer tr's losses (through a temporary file: a kill leaves the old picture)."""
    path = tr.out / "loss.png"
    return write_atomic(path, lambda f: save_loss_curve(np.arange(1, len(tr.losses) + 1), tr.losses, f))
