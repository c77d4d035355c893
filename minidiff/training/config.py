"""The training and sampling configs: one visible dataclass each, commented defaults.

The command-line flags are generated from these fields (`add_dataclass_args`), so a flag
and its config field always share a name (`--batch-size` is `batch_size`), a type and a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import numbers
import re
import typing
from dataclasses import dataclass

from ..backend import check_tf32, gpu_available
from ..data.resize import MAX_RESOLUTION
from ..diffusion.schedule import check_choice
from .optim import LR_SCHEDULES

# Where the CPU shards of a batch run (--shards): "threads", in this process, or "processes", in worker
# processes (each its own GIL); the same numbers either way (minidiff/fast/cpu/shards.py runs them).
SHARD_MODES = ("threads", "processes")
# --variance-type: the fixed types train alike (L_simple) and differ when sampling; learned_range adds C outputs
TRAIN_VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


@dataclass
class TrainConfig:
    """Every option of `minidiff train` (one flag per field: --batch-size is batch_size)."""
    # --- data and model ---
    data: str = "shapes16"           # built-in name (shapes16, shapes32) or a path: image folder (class subfolders or flat), MNIST IDX dir, CIFAR-10 dir, .npz (images [, labels, class_names]; see README "Your own data")
    resolution: int = -1             # crop each image to a square and resize it to S x S (1..512); -1 = the data's own size
    random_crop: bool = False        # with --resolution: crop at a random offset (drawn once per image from --seed) instead of the center
    out: str = "runs/shapes16"       # run directory: config, checkpoints, log, images
    preset: str = "small"            # U-Net preset: tiny, small, ddpm-cifar10
    conditioning: str = "auto"       # text | class | none | auto (text if captions, else class if labels, else none)
    max_prompt_len: int = 4          # tokens per prompt (padding id 0)
    # --- diffusion ---
    num_train_timesteps: int = 1000  # T
    beta_schedule: str = "linear"    # linear, scaled_linear, squaredcos_cap_v2, sigmoid
    prediction_type: str = "epsilon" # epsilon, sample, v_prediction
    snr_gamma: float = 0.0           # min-SNR-gamma loss weighting; 0 = off
    variance_type: str = "fixed_small"  # fixed_small | fixed_large (sigma of DDPM sampling) | learned_range (2C outputs)
    vlb_weight: float = 0.001        # lambda of learned_range's loss L_simple + lambda L_vlb (Nichol & Dhariwal 2021)
    p_uncond: float = 0.1            # probability of dropping the condition (classifier-free guidance training)
    # --- optimisation (DDPM: Adam 2e-4, warm-up 5000, clip 1, EMA 0.9999) ---
    steps: int = 1200                # optimizer steps in total (default run: ~5 min on 2 CPU cores)
    epochs: float = 0.0              # instead of --steps: passes over a finite dataset (steps = ceil(epochs N / (batch-size K))); 0 = use --steps
    batch_size: int = 64             # images per model call (micro-batch); an optimizer step sees batch-size x K images
    gradient_accumulation_steps: int = 1  # K: one optimizer step on the mean gradient of K micro-batches (= one batch of K x batch-size)
    optimizer: str = "adamw"         # adam | adamw
    lr: float = 2e-3                 # base learning rate (after the warm-up)
    weight_decay: float = 0.0        # AdamW's decoupled weight decay
    warmup_steps: int = 100          # linear learning-rate warm-up
    lr_schedule: str = "constant"    # after the warm-up: constant | linear (to 0 at the last step) | cosine (to 0 at the last step)
    grad_clip: float = 1.0           # global-norm clip; 0 = off
    ema_decay: float = 0.995         # EMA of the weights, used for sampling
    ema_warmup: bool = True          # decay_t = min(ema_decay, (1 + t) / (10 + t))
    hflip: bool = False              # random horizontal flips
    dropout: float = -1.0            # U-Net dropout; -1 = the preset's
    # --- checkpoints, images, logging ---
    save_every: int = 300            # checkpoint every N steps (and at the end)
    checkpoints_total_limit: int = -1  # also keep checkpoints/step_XXXXXX.npz of the last N saves (older ones deleted); -1 = only latest.npz
    sample_every: int = 600          # EMA sample grid every N steps (and at the end); 0 = only at the end
    sample_steps: int = 25           # DDIM steps for the preview grids
    guidance_scale: float = 3.0      # classifier-free guidance scale of the preview grids
    log_every: int = 10              # JSONL log line every N steps
    eval_every: int = 0              # labelled data: classifier accuracy and Frechet distance of a few samples into log.jsonl every N steps (shapes: pixel-checker accuracy); 0 = off
    eval_n_per_class: int = 4        # --eval-every: samples per class (DDIM --sample-steps, --guidance-scale, seed 1)
    eval_classifier: str = ""        # --eval-every: folder of the clean-data eval classifier, trained there once ('' = OUT/eval_classifier)
    eval_classifier_steps: int = 300  # --eval-every: steps of that classifier when it is trained
    # --- run ---
    seed: int = 0                    # seed of every random draw (weights, data, noise, dropout)
    device: str = "cpu"              # cpu | gpu (CuPy) | auto (the GPU when CuPy sees one, else the CPU)
    dtype: str = "float32"           # float32 | float64
    threads: int = 0                 # CPU threads, each runs a shard of the batch; 0 = one per core (at most 4)
    shards: str = "processes"        # where the CPU shards run: processes (each its own GIL; faster) | threads; same numbers
    tf32: bool = False               # GPU float32 matmuls in TF32 on the tensor cores (faster, ~1e-3 relative error)
    reference: bool = False          # run the readable reference ops (nn/) instead of the fast ones; slower, same numbers up to rounding
    resume: bool = False             # continue the run in --out from its latest checkpoint


@dataclass
class SampleConfig:
    """Every option of `minidiff sample` (one flag per field; class_id is --class)."""
    checkpoint: str = ""             # a run directory, a checkpoint .npz, or a diffusers pipeline or UNet2DModel folder
    out: str = ""                    # output folder of the PNG grid and the .npz (images, labels or prompts); '' = RUN/samples of the run sampled (./samples for a diffusers folder)
    prompt: str = ""                 # text prompt(s), separated by ';' (text-conditioned models)
    class_id: int = -1               # class label (class-conditioned models); -1 = every class in turn
    guidance_scale: float = 3.0      # s: eps = eps_uncond + s (eps_cond - eps_uncond); 1 = plain conditional
    guidance_rescale: float = 0.0    # Lin et al. 2023 rescale phi
    sampler: str = "ddim"            # ddpm | ddim | euler | euler_a | heun | dpm++2m (the last four: sigma-schedule ODE/SDE solvers)
    karras: bool = False             # Karras et al. (2022) sigmas (rho = 7) for euler, euler_a, heun, dpm++2m; not ddpm/ddim
    steps: int = 50                  # number of inference steps
    eta: float = 0.0                 # DDIM eta (0 = deterministic)
    n: int = 16                      # number of samples
    classifier: str = ""             # classifier checkpoint for classifier guidance
    classifier_scale: float = 0.0    # classifier guidance scale
    no_ema: bool = False             # sample with the raw weights instead of the EMA
    seed: int = 0                    # seed of the initial noise and of any sampling noise
    device: str = "cpu"              # cpu | gpu (CuPy) | auto (the GPU when CuPy sees one, else the CPU)
    dtype: str = "float32"           # float32 | float64
    threads: int = 0                 # CPU threads, each runs a shard of the batch; 0 = one per core (at most 4)
    shards: str = "processes"        # where the CPU shards run: processes (each its own GIL; faster) | threads; same numbers
    tf32: bool = False               # GPU float32 matmuls in TF32 on the tensor cores (faster, ~1e-3 relative error)
    reference: bool = False          # run the readable reference ops (nn/) instead of the fast ones; slower, same numbers up to rounding
    noise: str = ""                  # .npy of injected noise: x_T (N, C, H, W), or (1 + steps, N, C, H, W) = x_T, then each step's draw
    use_clipped_model_output: bool = True  # DDIM: eps re-derived from the clipped x0^ (DDIMPipeline's default: False)
    # --- the scheduler of a bare diffusers UNet2DModel folder (a run or a pipeline has its own): 0 / '' = DDPMScheduler's default ---
    num_train_timesteps: int = 0     # T (default 1000)
    beta_schedule: str = ""          # linear (default), scaled_linear, squaredcos_cap_v2, sigmoid
    beta_start: float = 0.0          # beta_0 (default 0.0001)
    beta_end: float = 0.0            # beta_{T-1} (default 0.02)
    prediction_type: str = ""        # epsilon (default), sample, v_prediction

# SampleConfig's fields that set a bare UNet2DModel folder's DDPMScheduler (their 0 / '' means "not given")
SCHEDULER_FLAGS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_comments(cls) -> dict:
    """{field: its end-of-line comment in the class body}: the flags' help texts (none without the source)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = (re.match(r"\s+(\w+): [^#]*#\s*(.+)$", line) for line in source.splitlines())
    return {m.group(1): m.group(2).strip() for m in found if m}


def add_dataclass_args(parser: argparse.ArgumentParser, cls, exclude=(), renames=None) -> None:
    """Add one flag per dataclass field: --field-name, typed, defaulting to the field's default, with
    the field's comment as its help (a parser with ArgumentDefaultsHelpFormatter adds the default)."""
    renames = renames or {}
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        flag = renames.get(f.name, _flag(f.name))
        typ = hints[f.name]
        help_text = comments.get(f.name, f.name.replace("_", " "))
        if typ is bool and f.name.startswith("no_"):  # --no-ema: a plain switch (no --no-no-ema)
            parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
        elif typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:  # a float flag is refused as typed when not finite (finite_float); dataclass_from_args checks again
            parser.add_argument(flag, dest=f.name, type=finite_float if typ is float else typ, default=f.default,
                                metavar=typ.__name__.upper(), help=help_text)


def dataclass_from_args(cls, args: argparse.Namespace):
    """Build the dataclass from parsed args (fields missing from args keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for k, v in values.items():
        if isinstance(v, float):
            check_finite(f"--{k.replace('_', '-')}", v)
    return cls(**values)


def finite_float(text: str) -> float:
    """float(text), refused unless finite, naming what was typed: "1e400" overflows to inf, and "got inf" would not
    say which value it was (argparse prints "argument --lr: must be a finite number, got 1e400")."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def check_finite(flag: str, value, low: float | None = None, high: float | None = None) -> None:
    """ValueError naming flag unless value is a finite number (issue 17: nan/inf flags ran to garbage),
    and within [low, high] where given."""
    if not (isinstance(value, numbers.Real) and math.isfinite(value)):
        raise ValueError(f"{flag} must be a finite number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{low}, {high}]" if low is not None and high is not None else (f">= {low}" if low is not None
                                                                              else f"<= {high}")
        raise ValueError(f"{flag} must be {'in ' if rng.startswith('[') else ''}{rng}, got {value}")


def validate_sample_config(cfg: SampleConfig) -> None:
    """Clear errors for bad `minidiff sample` float flags and --class, each naming the flag."""
    check_finite("--guidance-scale", cfg.guidance_scale)
    check_finite("--guidance-rescale", cfg.guidance_rescale, 0.0, 1.0)
    check_finite("--eta", cfg.eta, 0.0)
    check_finite("--classifier-scale", cfg.classifier_scale)
    if cfg.class_id < -1:
        raise ValueError(f"--class must be -1 (every class in turn) or a class id >= 0, got {cfg.class_id}")


def check_shards(shards) -> str:
    """Return shards, or raise ValueError naming --shards unless it is 'threads' or 'processes'."""
    if shards not in SHARD_MODES:
        raise ValueError(f"--shards must be one of {list(SHARD_MODES)}, got {shards!r}")
    return shards


def check_threads(threads) -> int:
    """Return threads, or raise ValueError naming --threads unless it is an int >= 0 (0 = one per core)."""
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 0:
        raise ValueError(f"workers (--threads) must be an int >= 0 (0 = one per CPU core, at most 4), got {threads!r}")
    return int(threads)


def resolve_device(device: str) -> str:
    """--device auto -> 'gpu' when CuPy sees a GPU, else 'cpu'; cpu and gpu as given."""
    return ("gpu" if gpu_available() else "cpu") if device == "auto" else device


def validate_train_config(cfg: TrainConfig) -> None:
    """Clear errors for bad training options, each naming the flag."""
    check_choice("--conditioning", cfg.conditioning, ("text", "class", "none", "auto"))
    check_choice("--optimizer", cfg.optimizer, ("adam", "adamw"))
    check_choice("--device", cfg.device, ("cpu", "gpu", "auto"))
    check_choice("--dtype", cfg.dtype, ("float32", "float64"))
    check_choice("--lr-schedule", cfg.lr_schedule, LR_SCHEDULES)
    if cfg.resolution != -1 and not 1 <= cfg.resolution <= MAX_RESOLUTION:
        raise ValueError(f"--resolution must be in [1, {MAX_RESOLUTION}] (or -1 = the data's own size), "
                         f"got {cfg.resolution}")
    if cfg.random_crop and cfg.resolution == -1:
        raise ValueError("--random-crop needs --resolution S (the side of the crop)")
    if cfg.gradient_accumulation_steps < 1:
        raise ValueError(f"--gradient-accumulation-steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    if cfg.checkpoints_total_limit != -1 and cfg.checkpoints_total_limit < 1:
        raise ValueError(f"--checkpoints-total-limit must be >= 1 (or -1 = keep only latest.npz), "
                         f"got {cfg.checkpoints_total_limit}")
    if not cfg.epochs >= 0:
        raise ValueError(f"--epochs must be >= 0 (0 = use --steps), got {cfg.epochs}")
    if cfg.variance_type == "learned":
        raise ValueError("--variance-type learned is not trainable here (its output is the variance itself, which a "
                         "network can make negative); use learned_range")
    check_choice("--variance-type", cfg.variance_type, TRAIN_VARIANCE_TYPES)
    if not cfg.vlb_weight >= 0:
        raise ValueError(f"--vlb-weight must be >= 0, got {cfg.vlb_weight}")
    if cfg.eval_every < 0 or cfg.eval_n_per_class < 1 or cfg.eval_classifier_steps < 1:
        raise ValueError(f"--eval-every must be >= 0, --eval-n-per-class and --eval-classifier-steps >= 1, got "
                         f"{cfg.eval_every}, {cfg.eval_n_per_class}, {cfg.eval_classifier_steps}")
    for name in ("steps", "batch_size", "max_prompt_len", "sample_steps", "log_every", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    check_threads(cfg.threads)
    check_shards(cfg.shards)
    check_tf32(cfg.tf32, resolve_device(cfg.device), cfg.dtype)
    if not 0.0 <= cfg.p_uncond < 1.0:
        raise ValueError(f"--p-uncond must be in [0, 1), got {cfg.p_uncond}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"--ema-decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    for flag, value, low, high in (("--lr", cfg.lr, 0.0, None), ("--grad-clip", cfg.grad_clip, 0.0, None),
                                   ("--weight-decay", cfg.weight_decay, 0.0, None),
                                   ("--snr-gamma", cfg.snr_gamma, 0.0, None), ("--dropout", cfg.dropout, None, 1.0),
                                   ("--guidance-scale", cfg.guidance_scale, None, None)):
        check_finite(flag, value, low, high)
