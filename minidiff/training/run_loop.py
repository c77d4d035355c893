"""The loop of a training run: Trainer.train_step until cfg.steps, and around it what a run does every N steps.

    every flush_every (1 on a CPU) or log_every steps   read the losses back (Trainer.flush_losses), the progress bar
    every log_every steps                                 one line of log.jsonl: step, loss, lr, images/s, elapsed
    every save_every steps                                checkpoints/latest.npz (Trainer.save, behind a NaN guard)
    every sample_every steps                              samples/step_XXXXXX.png (previews.py)
    every eval_every steps                                one line of log.jsonl: eval accuracy (eval_classifier.py)
    the last step                                         all of these; then loss.png

Shape legend: none.
"""

from __future__ import annotations

import json
import time

from .eval_classifier import eval_during_training
from .previews import save_loss_png
from .report import ProgressBar
from ..model.unet import count_params


def run_loop(trainer, stop_after: int | None = None) -> dict:
    """Train a Trainer until cfg.steps (or stop_after more steps, to simulate an interruption), logging, saving,
    previewing and evaluating on the way; {steps, seconds, final_loss}. The caller holds the run folder's lock."""
    tr, cfg = trainer, trainer.cfg
    end = cfg.steps if stop_after is None else min(cfg.steps, tr.step + stop_after)
    tr.log(f"minidiff train: {tr.dataset.name} ({tr.conditioning}), preset {cfg.preset}, "
           f"{count_params(tr.params):,} params, {cfg.device} {cfg.dtype}, steps {tr.step}->{end}")
    bar = ProgressBar(cfg.steps, start=tr.step)
    bar_step = tr.step
    t0, log_path = time.perf_counter(), tr.out / "log.jsonl"
    with open(log_path, "a") as logf:
        while tr.step < end:
            tr.train_step()
            if tr.step % tr.flush_every == 0 or tr.step % cfg.log_every == 0 or tr.step == end:
                loss = tr.flush_losses()
                bar.update(tr.step, tr.rows * (tr.step - bar_step), loss=loss)
                bar_step = tr.step
            if tr.step % cfg.log_every == 0 or tr.step == end:
                rec = {"step": tr.step, "loss": loss, "lr": tr.lr(tr.step - 1),
                       "images_per_s": round(bar.items / max(time.perf_counter() - t0, 1e-9), 2),
                       "elapsed_s": round(time.perf_counter() - t0, 2)}
                logf.write(json.dumps(rec) + "\n")
                logf.flush()
            if tr.step % cfg.save_every == 0 or tr.step == end:
                tr.flush_losses()
                tr.save()
            if (cfg.sample_every and tr.step % cfg.sample_every == 0) or tr.step == cfg.steps:
                tr.sample_grid()
            if cfg.eval_every and (tr.step % cfg.eval_every == 0 or tr.step == cfg.steps):
                logf.write(json.dumps({"step": tr.step, **eval_during_training(tr)}) + "\n")
                logf.flush()
    bar.close()
    save_loss_png(tr)
    elapsed = time.perf_counter() - t0
    return {"steps": tr.step, "seconds": elapsed, "final_loss": tr.losses[-1] if tr.losses else None}
