"""Checks of the command line's flags and inputs made before a command writes anything.

    check_model_flags(cfg)    --preset, --beta-schedule, --prediction-type, --dropout, --warmup-steps, T
    check_sample_flags(cfg)   sample's --n, --steps, --dtype, --checkpoint
    check_eval_flags(args)    eval's --scales and counts (--n-per-class, --steps, --n, --batch-size, ...)
    load_noise(path)          a --noise .npy file: one finite float array, read without pickle

The bounds (cli.MAX_SAMPLES, cli.MAX_TRAIN_TIMESTEPS) are named in the error lines; cli.py re-exports them.
Shape legend: none (flags and files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MAX_SAMPLES = 100_000  # the most images (--n, --n-per-class) or steps one sample/eval command takes
MAX_TRAIN_TIMESTEPS = 100_000  # --num-train-timesteps' upper bound (DDPM uses 1000; each T costs T floats)


def check_model_flags(cfg) -> None:
    """--preset, --beta-schedule, --prediction-type, --dropout, --warmup-steps and --num-train-timesteps, checked
    before anything is written (train checks them only after it made the run folder, or at the first loss)."""
    from .diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES
    from .model.config import PRESETS

    for flag, value, allowed in (("--preset", cfg.preset, PRESETS), ("--beta-schedule", cfg.beta_schedule,
                                 BETA_SCHEDULES), ("--prediction-type", getattr(cfg, "prediction_type", "epsilon"),
                                                   PREDICTION_TYPES)):
        if value not in allowed:
            raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
    if getattr(cfg, "dropout", -1.0) != -1.0 and not 0.0 <= cfg.dropout <= 1.0:
        raise ValueError(f"--dropout must be -1 (the preset's) or in [0, 1], got {cfg.dropout}")
    if getattr(cfg, "warmup_steps", 0) < 0:
        raise ValueError(f"--warmup-steps must be >= 0, got {cfg.warmup_steps}")
    if not 1 <= cfg.num_train_timesteps <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"--num-train-timesteps must be in [1, {MAX_TRAIN_TIMESTEPS:,}] (cli.MAX_TRAIN_TIMESTEPS), "
                         f"got {cfg.num_train_timesteps}")


def check_sample_flags(cfg) -> None:
    """`minidiff sample`'s --n and --steps (in [1, MAX_SAMPLES]), --dtype and --checkpoint (required)."""
    for flag, value in (("--n", cfg.n), ("--steps", cfg.steps)):
        if not 1 <= value <= MAX_SAMPLES:
            raise ValueError(f"{flag} must be in [1, {MAX_SAMPLES:,}] (cli.MAX_SAMPLES), got {value}")
    if cfg.dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {cfg.dtype!r}")
    if not cfg.checkpoint:
        raise ValueError("--checkpoint is required: a run directory, a checkpoint .npz or a diffusers folder")


def check_eval_flags(args) -> None:
    """`minidiff eval`'s --scales (finite numbers) and counts (--n-per-class, --steps, --n, --batch-size,
    --nll-timesteps, --threads: at most MAX_SAMPLES)."""
    from .training.config import check_finite

    for scale in args.scales:
        check_finite("--scales", scale)
    for flag, value, low in (("--n-per-class", args.n_per_class, 1), ("--steps", args.steps, 1), ("--n", args.n, 1),
                             ("--batch-size", args.batch_size, 1), ("--nll-timesteps", args.nll_timesteps, 0),
                             ("--threads", args.threads, 0)):
        if not low <= value <= MAX_SAMPLES:
            raise ValueError(f"{flag} must be in [{low}, {MAX_SAMPLES:,}] (cli.MAX_SAMPLES), got {value}")


def load_noise(path) -> np.ndarray:
    """The float array of a --noise .npy file (read without pickle); one line naming the file otherwise."""
    if Path(path).exists() and not Path(path).is_file():  # a folder, a FIFO (would block), a device
        raise ValueError(f"--noise {path!r} is not a regular file; pass an .npy file written by np.save")
    try:
        noise = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"--noise {path!r} is not a readable .npy file: {str(err).splitlines()[0]}") from None
    if not isinstance(noise, np.ndarray) or not np.issubdtype(noise.dtype, np.floating):
        raise ValueError(f"--noise {path!r} must hold one float array (np.save), got {getattr(noise, 'dtype', noise)}")
    if not np.isfinite(noise).all():
        raise ValueError(f"--noise {path!r} holds non-finite values (NaN or inf); pass finite Gaussian noise")
    return noise
