"""A trained model as one object: U-Net config and weights, schedule, and how it is conditioned.

The train loop writes checkpoints; `minidiff sample`, `minidiff eval` and the preview grids read
them back through `load_bundle`. The condition of a batch is one array:
    text   token ids int64 (N, L), id 0 = padding; the all-padding row is the empty prompt (unconditional)
    class  labels int64 (N,); the extra id num_classes is the null class (unconditional)
    none   None
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import to_device
from .checkpoint import load_checkpoint
from .run_meta import check_arrays, check_finite_weights, check_model_meta
from .pipelines import MODEL_INDEX, bundle_fields, is_diffusers_folder
from ..data.dataset import caption_of
from ..data.tokenizer import Tokenizer
from ..diffusion.schedule import make_schedule
from ..model.config import UNetConfig, get_preset
from ..model.pretrained import DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, PICKLE_SUFFIXES, refuse_pickle
from ..model.unet import unet_forward
from ..nn.ops import REFERENCE, Ops

CONDITIONINGS = ("text", "class", "none")
TEXT_WIDTH = 64  # width of the prompt-token embeddings (cross_attention_dim) for text models


def choose_conditioning(requested: str, dataset) -> str:
    """'auto' -> text when the data has captions (class names), class when it has labels, else none."""
    has_text = bool(getattr(dataset, "all_captions", None))
    named = getattr(dataset, "has_captions", has_text)  # labels without names: numbers are no captions
    has_labels = bool(getattr(dataset, "num_classes", 0))
    if requested == "auto":
        return "text" if has_text and named else ("class" if has_labels else "none")
    if requested == "text" and not has_text:
        raise ValueError(f"--conditioning text needs captions or class names, and {dataset.name} has none")
    if requested == "class" and not has_labels:
        raise ValueError(f"--conditioning class needs labels, and {dataset.name} has none")
    return requested


def build_unet_config(preset: str, dataset, conditioning: str, vocab_size: int = 0,
                      dropout: float = -1.0) -> UNetConfig:
    """The preset, resized to the data (sample_size, channels) and given its conditioning inputs."""
    base = get_preset(preset)
    changes = dict(sample_size=dataset.image_size, in_channels=dataset.channels, out_channels=dataset.channels)
    if conditioning == "class":
        changes["num_class_embeds"] = dataset.num_classes + 1  # + the null class
    if conditioning == "text":
        changes.update(cross_attention_dim=TEXT_WIDTH, context_vocab_size=vocab_size)
    if dropout >= 0:
        changes["dropout"] = dropout
    try:
        return dataclasses.replace(base, **changes)
    except ValueError as err:
        raise ValueError(f"preset {preset!r} does not fit data {dataset.name!r}: {err}") from None


@dataclass
class Bundle:
    """Everything needed to sample: weights, U-Net config, schedule and conditioning."""

    params: dict
    config: UNetConfig
    schedule: object
    conditioning: str
    prediction_type: str = "epsilon"
    tokenizer: Tokenizer | None = None
    num_classes: int = 0
    class_names: list | None = None
    image_size: int = 16
    ops: Ops = REFERENCE  # who runs the ops (nn/ops.py); the entry points pass the fast table unless --reference
    sampler_options: dict = field(default_factory=dict)  # sample()'s options from a diffusers scheduler (pipelines.py)

    def model_fn(self, x_t, t, cond):
        """model_fn(x_t (N, C, H, W), t (N,), cond) -> model output (N, C, H, W), for the samplers."""
        batch = dict(x=x_t, t=t, class_labels=cond if self.conditioning == "class" else None,
                     context=cond if self.conditioning == "text" else None)
        return self.ops.map_forward(model_output, batch, params=self.params, config=self.config, ops=self.ops)

    @property
    def null_condition(self):
        """The unconditional condition: the empty prompt (all padding) or the null class id."""
        if self.conditioning == "text":
            return np.zeros(self.tokenizer.max_len, np.int64)
        if self.conditioning == "class":
            if self.num_classes >= (self.config.num_class_embeds or 0):
                raise ValueError(f"this class-conditioned model has no null class (id {self.num_classes}) for "
                                 "classifier-free guidance: use --guidance-scale 1")
            return np.int64(self.num_classes)
        return None

    def encode(self, prompts=None, class_ids=None, n: int = 1):
        """Host condition array for n samples from prompts (text) or class ids (class)."""
        if self.conditioning == "text":
            prompts = [""] * n if prompts is None else list(prompts)
            return self.tokenizer.encode(prompts)
        if self.conditioning == "class":
            ids = np.asarray(class_ids if class_ids is not None else np.arange(n) % self.num_classes, np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
                raise ValueError(f"--class must be in [0, {self.num_classes}), got {ids.min()}..{ids.max()}")
            return ids
        return None

    def default_prompts(self, n: int) -> list:
        """Labels for a preview grid: each class caption (or class id) in turn, n in all."""
        if self.conditioning == "text":
            names = self.class_names or [""]
            return [caption_of(names[i % len(names)]) for i in range(n)]
        if self.conditioning == "class":
            return [i % self.num_classes for i in range(n)]
        return [""] * n


def model_output(batch: dict, params, config, ops=REFERENCE):
    """eps_theta(x, t[, y][, prompt]) (N, C, H, W) for inference (no dropout, no backward cache).

    batch: x (N, C, H, W); t a scalar or (N,); class_labels (N,) or None; context (N, L) or None.
    ops.map_forward runs it on the whole batch or on its rows (worker processes import it by name)."""
    return unet_forward(params, config, batch["x"], batch["t"], batch["class_labels"], batch["context"],
                        for_backward=False, ops=ops)[0]


def bundle_from_meta(arrays: dict, meta: dict, use_ema: bool = True, device: str = "cpu",
                     dtype: str = "float32") -> Bundle:
    """Rebuild a Bundle from a training checkpoint's arrays and metadata."""
    cfg = UNetConfig.from_dict(meta["model_config"])
    t = meta["train_config"]
    schedule = make_schedule(t["num_train_timesteps"], t["beta_schedule"])
    src = arrays["ema"] if use_ema and "ema" in arrays else arrays["params"]
    params = {k: to_device(np.asarray(v, dtype=dtype), device) for k, v in src.items()}
    tok = Tokenizer.from_dict(meta["tokenizer"]) if meta.get("tokenizer") else None
    variance = t.get("variance_type", "fixed_small")  # learned_range: DDPM sampling uses the model's variance
    return Bundle(params, cfg, schedule, meta["conditioning"], t["prediction_type"], tok,
                  meta.get("num_classes", 0), meta.get("class_names"), cfg.sample_size,
                  sampler_options={} if variance == "fixed_small" else {"variance_type": variance})


def resolve_checkpoint(path) -> Path:
    """A run directory -> its latest checkpoint; a file -> itself. Clear errors when missing."""
    p = Path(path).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(p)
    if p.is_dir() and not (p / "checkpoints" / "latest.npz").exists():
        raise FileNotFoundError(f"{str(p)!r} is neither a minidiff run (no checkpoints/latest.npz) nor a diffusers "
                                f"model (no {MODEL_INDEX}, no {DIFFUSERS_CONFIG} with {DIFFUSERS_WEIGHTS})")
    if p.is_dir():
        p = p / "checkpoints" / "latest.npz"
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist; pass a run directory or a .npz "
                                "written by minidiff train")
    return p


def load_bundle(path, use_ema: bool = True, device: str = "cpu", dtype: str = "float32",
                scheduler: dict | None = None) -> Bundle:
    """Load a run directory or checkpoint file for sampling, or a diffusers pipeline or UNet2DModel folder
    (pipelines.py; scheduler: DDPMScheduler options for a bare UNet2DModel folder, None = its defaults)."""
    if is_diffusers_folder(path):
        return Bundle(**bundle_fields(path, use_ema, device, dtype, scheduler))
    if scheduler:
        raise ValueError(f"{path} is a minidiff run with its own schedule; the scheduler flags "
                         f"({', '.join('--' + k.replace('_', '-') for k in scheduler)}) apply to a bare "
                         "UNet2DModel folder only")
    arrays, meta = load_run(path)
    return bundle_from_meta(arrays, meta, use_ema, device, dtype)


def load_run(path) -> tuple:
    """(arrays, meta) of a diffusion-model run directory or checkpoint file; ValueError for anything else."""
    file = resolve_checkpoint(path)
    arrays, meta = load_checkpoint(file)
    if meta.get("kind") == "classifier":
        raise ValueError(f"{path} is a classifier checkpoint (minidiff train-classifier); pass it as --classifier "
                         "and a diffusion model run as --checkpoint")
    if "model_config" not in meta or "train_config" not in meta:
        raise ValueError(f"{str(file)!r} is not a diffusion-model checkpoint written by minidiff train")
    check_arrays(arrays, check_model_meta(meta, file), file)  # each field bundle_from_meta reads, named if bad
    check_finite_weights(arrays, file)
    return arrays, meta
