"""A Trainer's state in and out of checkpoints/latest.npz: the save with its NaN guard, and the resume.

save_state writes weights, EMA, Adam moments, rng state, step, losses and the ops record atomically
(checkpoint.py), but never weights that are not finite or give a non-finite output (check_savable: the
last good checkpoint stays). restore_state checks the checkpoint's metadata and arrays field by field
(run_meta.py), that it was made with this run's settings (RESUME_FIELDS, the model config), loads it,
trims log.jsonl back to its step and says in one line when the ops differ from the recorded ones.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checkpoint import check_config, keep_last_checkpoints, load_checkpoint, rng_state, save_checkpoint
from .run_folder import ops_notice, ops_record, trim_log
from .run_meta import check_arrays, check_finite_weights, check_model_meta, check_resume_meta, check_train_config
from ..diffusion.loss import sample_timesteps
from ..diffusion.schedule import add_noise
from ..model.unet import unet_forward

# the settings a resumed run must share with the run it continues
RESUME_FIELDS = ("data", "preset", "conditioning", "max_prompt_len", "num_train_timesteps", "beta_schedule",
                 "prediction_type", "batch_size", "optimizer", "seed", "dtype", "dropout", "resolution", "random_crop",
                 "gradient_accumulation_steps")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step."""


def save_state(trainer) -> Path:
    """Write checkpoints/latest.npz atomically: weights, EMA, Adam moments, rng state, step, losses, ops record.

    Never writes weights that are not finite or whose output is not (check_savable): the last good
    checkpoint stays."""
    opt = trainer.opt.state_dict()
    check_savable(trainer, opt)
    meta = trainer.meta() | {"step": trainer.step, "losses": trainer.losses, "rng": rng_state(trainer.rng),
                             "ema_num_updates": trainer.ema.num_updates, "opt_step": opt["step"]}
    arrays = {"params": trainer.params, "ema": trainer.ema.shadow,
              "opt": {"exp_avg": opt["exp_avg"], "exp_avg_sq": opt["exp_avg_sq"]}}
    path = save_checkpoint(trainer.out / "checkpoints" / "latest.npz", arrays, meta)
    if trainer.cfg.checkpoints_total_limit > 0:
        keep_last_checkpoints(path, trainer.step, trainer.cfg.checkpoints_total_limit)
    return path


def check_savable(tr, opt: dict) -> None:
    """Raise TrainingDiverged if the weights of Trainer tr (or its EMA weights, or Adam moments opt) are not all
    finite, or if the weights and the EMA weights give a non-finite output on a probe batch. The probe batch is
    drawn from its own generator (seeded by the step), so the training rng is untouched: a diverged
    step can leave finite but huge weights (--lr 1e6: |w| ~ 1e4) whose next loss is NaN."""
    xp = tr.xp
    groups = {"weights": tr.params, "EMA weights": tr.ema.shadow,
              "Adam moments": {**{f"m.{k}": v for k, v in opt["exp_avg"].items()},
                               **{f"v.{k}": v for k, v in opt["exp_avg_sq"].items()}}}
    bad = next(((g, k) for g, arrays in groups.items() for k, v in arrays.items()
                if not bool((np if isinstance(v, np.ndarray) else xp).isfinite(v).all())), None)
    if bad is not None:
        bad = (bad[0], f"are not finite ({bad[1]})")
    if bad is None:
        rng = np.random.default_rng(tr.step)
        x0, cond = tr.draw_data(rng)
        t = sample_timesteps(rng, tr.rows, tr.cfg.num_train_timesteps)
        x_t = add_noise(tr.schedule, xp.asarray(x0, tr.dtype), xp.asarray(rng.standard_normal(x0.shape), tr.dtype), t)
        with np.errstate(all="ignore"):  # an overflow here is the answer, not a warning to print
            for name, params in (("weights", tr.params), ("EMA weights", tr.ema.shadow)):
                out = unet_forward(params, tr.model_config, x_t, t, cond if tr.conditioning == "class" else None,
                                   cond if tr.conditioning == "text" else None, for_backward=False, ops=tr.ops)[0]
                if not bool(xp.isfinite(out).all()):
                    bad = (name, "give a non-finite output on a probe batch")
                    break
    if bad is not None:
        latest = tr.out / "checkpoints" / "latest.npz"
        kept = f"the last good checkpoint ({latest}) is kept" if latest.exists() else "no checkpoint was written"
        raise TrainingDiverged(f"the {bad[0]} after step {tr.step} {bad[1]}; training stopped, they were not "
                               f"saved and {kept}. Try a lower --lr or --grad-clip")


def restore_state(trainer, path: Path) -> None:
    """Load checkpoint `path` into trainer (weights, EMA, Adam, rng, step, losses) after checking its metadata
    and arrays; then trim log.jsonl to its step and print a line if the ops differ from the recorded ones."""
    arrays, meta = load_checkpoint(path)
    saved = check_train_config(meta.get("train_config"), path)  # defaults filled in for newer fields
    config = check_model_meta(meta, path)
    check_config({k: saved[k] for k in RESUME_FIELDS}, {k: getattr(trainer.cfg, k) for k in RESUME_FIELDS},
                 "training config", path)
    check_config(config.to_dict(), trainer.model_config.to_dict(), "model config", path)
    check_arrays(arrays, config, path, groups=("params", "ema", "opt/exp_avg", "opt/exp_avg_sq"))
    check_finite_weights(arrays, path)  # a diverged run is not continued
    rng = check_resume_meta(meta, path)
    for k, v in arrays["params"].items():
        trainer.params[k][...] = trainer.xp.asarray(v, dtype=trainer.dtype)
    trainer.ema.load_state_dict({"shadow": arrays["ema"], "num_updates": meta["ema_num_updates"]})
    trainer.opt.load_state_dict({"step": meta["opt_step"], **arrays["opt"]})
    trainer.rng = rng
    trainer.step, trainer.losses = meta["step"], list(meta["losses"])
    trim_log(trainer.out / "log.jsonl", trainer.step)  # the log matches the weights
    notice = ops_notice(meta.get("ops"), ops_record(trainer.ops, gpu=trainer.xp is not np))
    if notice:
        trainer.log(notice)
