"""diffusers folders in: what `minidiff sample` and `minidiff eval` read when --checkpoint is a folder of diffusers.

    FOLDER/model_index.json                    {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
    FOLDER/unet/config.json                    UNet2DModel's config   } read by model/pretrained.py, which
    FOLDER/unet/diffusion_pytorch_model.safetensors                   } keeps the state-dict names
    FOLDER/scheduler/scheduler_config.json     DDPMScheduler / DDIMScheduler options, mapped below
    FOLDER/minidiff.json                       minidiff's own (written by `minidiff export`): conditioning,
                                               tokenizer, class names; absent from other pipelines
A bare UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors) takes its scheduler from the
command line's flags (DDPMScheduler's defaults otherwise). Every file is read as JSON or safetensors, never
through pickle; a bad file or an option minidiff lacks is one ValueError line naming it.

A scheduler's options keep their diffusers names in minidiff (diffusion/schedule.py, diffusion/sampler.py):
    num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr -> make_schedule
    prediction_type                                                   -> Bundle.prediction_type
    variance_type, clip_sample, clip_sample_range, timestep_spacing, steps_offset, set_alpha_to_one -> sample()
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..backend import to_device
from ..data.tokenizer import Tokenizer
from ..diffusion.sampler import VARIANCE_TYPES
from ..diffusion.schedule import PREDICTION_TYPES, check_choice, make_schedule
from ..diffusion.timesteps import TIMESTEP_SPACINGS
from ..model.config import LIMITS
from ..model.pretrained import DIFFUSERS_CONFIG, load_pretrained, read_json

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"
MINIDIFF_META = "minidiff.json"
PIPELINES = ("DDPMPipeline", "DDIMPipeline")
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")
# scheduler_config.json fields with DDPMScheduler's / DDIMScheduler's defaults (for a field a file leaves out)
SCHEDULE_FIELDS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                       trained_betas=None, rescale_betas_zero_snr=False)
SAMPLER_FIELDS = dict(variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0, timestep_spacing="leading",
                      steps_offset=0, set_alpha_to_one=True)
# fields that change nothing here: the thresholding knobs while thresholding is off; diffusers < 0.3's array type
IGNORED_FIELDS = ("dynamic_thresholding_ratio", "sample_max_value", "tensor_format")
# the JSON type of each field a scheduler_config.json may set ("number": finite int or float)
FIELD_KINDS = dict(num_train_timesteps="int", beta_start="number", beta_end="number", beta_schedule="str",
                   trained_betas="betas", rescale_betas_zero_snr="bool", variance_type="str", clip_sample="bool",
                   clip_sample_range="number", timestep_spacing="str", steps_offset="int", set_alpha_to_one="bool",
                   prediction_type="str")
MAX_TRAIN_TIMESTEPS = 1_000_000  # num_train_timesteps of a file: DDPM's is 1000; the schedule holds T floats
CONDITIONINGS = ("text", "class", "none")
MAX_PROMPT_TOKENS = 4096  # a tokenizer's max_len: every prompt is encoded to that many ids


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_field(key: str, value, source: str) -> None:
    """ValueError naming source and key unless value has the JSON type FIELD_KINDS gives key."""
    kind = FIELD_KINDS[key]
    ok = {"int": isinstance(value, int) and not isinstance(value, bool), "number": _is_number(value),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "betas": value is None or isinstance(value, list) and all(_is_number(b) for b in value)}[kind]
    if not ok:
        kind = "a list of numbers or null" if kind == "betas" else f"a {'finite ' * (kind == 'number')}{kind}"
        raise ValueError(f"{source}: {key} must be {kind}, got {repr(value)[:80]}")
    if key == "num_train_timesteps" and not 1 <= value <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(f"{source}: num_train_timesteps must be in 1..{MAX_TRAIN_TIMESTEPS:,} "
                         f"(MAX_TRAIN_TIMESTEPS), got {value}")


def is_diffusers_folder(path) -> bool:
    """True for a folder holding model_index.json (a pipeline), or config.json beside diffusion_pytorch_model.*
    weights (a bare UNet2DModel; a minidiff run's folder holds a config.json of its own, and no weights)."""
    p = Path(path).expanduser()
    return p.is_dir() and ((p / MODEL_INDEX).is_file() or (
        (p / DIFFUSERS_CONFIG).is_file() and any(p.glob("diffusion_pytorch_model.*"))))


def scheduler_options(d: dict, source: str = "scheduler") -> tuple:
    """(make_schedule kwargs, prediction_type, sample() kwargs) of a DDPMScheduler / DDIMScheduler config dict.

    An unknown _class_name or field, thresholding=True or a value minidiff lacks is a ValueError naming it."""
    name = d.get("_class_name", "DDPMScheduler")
    if name not in SCHEDULERS:
        raise ValueError(f"{source}: scheduler _class_name {name!r} is not supported by minidiff (supported: "
                         f"{', '.join(SCHEDULERS)})")
    schedule, sampler = dict(SCHEDULE_FIELDS), dict(SAMPLER_FIELDS)
    prediction_type = "epsilon"
    for key, value in d.items():
        if key in FIELD_KINDS:
            check_field(key, value, source)
        if key in SCHEDULE_FIELDS:
            schedule[key] = value
        elif key in SAMPLER_FIELDS:
            sampler[key] = value
        elif key == "prediction_type":
            prediction_type = value
        elif key == "thresholding":
            if value:
                raise ValueError(f"{source}: thresholding=true (dynamic thresholding) is not implemented in minidiff")
        elif not key.startswith("_") and key not in IGNORED_FIELDS:
            raise ValueError(f"{source}: scheduler field {key!r} is not supported by minidiff")
    try:
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("variance_type", sampler["variance_type"], VARIANCE_TYPES)
        check_choice("timestep_spacing", sampler["timestep_spacing"], TIMESTEP_SPACINGS)
        make_schedule(**schedule)  # checks beta_schedule, the betas and num_train_timesteps
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None
    return schedule, prediction_type, sampler


def check_pipeline(folder: Path) -> dict:
    """model_index.json's contents, after checking minidiff builds its pipeline, U-Net and scheduler classes."""
    index = read_json(folder / MODEL_INDEX)
    source = str(folder / MODEL_INDEX)
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{source}: pipeline _class_name {name!r} is not supported by minidiff (supported: "
                         f"{', '.join(PIPELINES)})")
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if key not in ("unet", "scheduler"):
            raise ValueError(f"{source}: pipeline component {key!r} is not supported by minidiff (it reads unet "
                             "and scheduler)")
    for key in ("unet", "scheduler"):
        if not (folder / key).is_dir():
            raise ValueError(f"{source}: the pipeline has no {key}/ folder")
    return index


def pipeline_meta(meta: dict, config, source: str) -> tuple:
    """(conditioning, tokenizer or None, num_classes) of minidiff.json's contents, checked against the U-Net's
    config; a field of the wrong type or one that does not fit the U-Net is a ValueError naming it."""
    text, cls = config.cross_attention_dim is not None, config.num_class_embeds is not None
    fits = {"text": text, "class": cls, "none": not (text or cls)}
    conditioning = meta.get("conditioning") or next(c for c in CONDITIONINGS if fits[c])
    if not isinstance(conditioning, str) or not fits.get(conditioning):
        raise ValueError(f"{source}: conditioning {repr(conditioning)[:80]} does not fit this U-Net "
                         f"(cross_attention_dim={config.cross_attention_dim}, "
                         f"num_class_embeds={config.num_class_embeds})")
    tokenizer = None
    if meta.get("tokenizer"):
        try:
            tokenizer = Tokenizer.from_dict(meta["tokenizer"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{source}: tokenizer: {str(err)[:200]}") from None
        if tokenizer.max_len > MAX_PROMPT_TOKENS:
            raise ValueError(f"{source}: the tokenizer's max_len must be at most {MAX_PROMPT_TOKENS:,} "
                             f"(MAX_PROMPT_TOKENS), got {tokenizer.max_len:,}")
        if config.context_vocab_size is not None and tokenizer.vocab_size != config.context_vocab_size:
            raise ValueError(f"{source}: the tokenizer has {tokenizer.vocab_size} words, the U-Net's "
                             f"context_vocab_size is {config.context_vocab_size}")
    # a minidiff class model's last class id is the null class; a diffusers one has none (guidance scale 1)
    num_classes = meta.get("num_classes", config.num_class_embeds or 0)
    top = config.num_class_embeds if conditioning == "class" else LIMITS["num_class_embeds"]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or not 0 <= num_classes <= top:
        bound = "the U-Net's num_class_embeds" if conditioning == "class" else "config.LIMITS"
        raise ValueError(f"{source}: num_classes must be an int in 0..{top:,} ({bound}), got {repr(num_classes)[:80]}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{source}: class_names must be a list of strings, got {repr(names)[:80]}")
    return conditioning, tokenizer, num_classes


def bundle_fields(path, use_ema: bool = True, device: str = "cpu", dtype: str = "float32",
                  scheduler: dict | None = None) -> dict:
    """Bundle(**fields) of a diffusers pipeline folder or a bare UNet2DModel folder (is_diffusers_folder).

    scheduler: DDPMScheduler options (the command line's) for a bare UNet2DModel folder; a pipeline
    brings its own, so passing one there is a ValueError. use_ema: a pipeline holds one set of weights
    (`minidiff export` writes the EMA ones by default), so it changes nothing here."""
    folder = Path(path).expanduser()
    meta = {}
    if (folder / MODEL_INDEX).is_file():
        check_pipeline(folder)
        if scheduler:
            raise ValueError(f"{str(folder)!r} is a pipeline with its own scheduler/; the scheduler flags "
                             f"({', '.join('--' + k.replace('_', '-') for k in scheduler)}) apply to a bare "
                             "UNet2DModel folder only")
        scheduler = read_json(folder / SCHEDULER_CONFIG)
        source = str(folder / SCHEDULER_CONFIG)
        unet = folder / "unet"
        if (folder / MINIDIFF_META).is_file():
            meta = read_json(folder / MINIDIFF_META)
    else:
        scheduler, source, unet = dict(scheduler or {}), "scheduler flags", folder
    schedule_kw, prediction_type, sampler_kw = scheduler_options(scheduler, source)
    params, config = load_pretrained(unet, dtype=np.dtype(dtype))
    conditioning, tokenizer, num_classes = pipeline_meta(meta, config, str(folder / MINIDIFF_META))
    if conditioning == "text" and tokenizer is None:
        raise ValueError(f"{str(folder)!r}: a text-conditioned U-Net needs the tokenizer of {MINIDIFF_META} "
                         "(written by minidiff export)")
    return dict(params={k: to_device(v, device) for k, v in params.items()}, config=config,
                schedule=make_schedule(**schedule_kw), conditioning=conditioning, prediction_type=prediction_type,
                tokenizer=tokenizer, num_classes=num_classes, class_names=meta.get("class_names"),
                image_size=config.sample_size, sampler_options=sampler_kw)
