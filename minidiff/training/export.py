"""`minidiff export`: a training run out as a diffusers pipeline folder (the layout pipelines.py reads).

    OUT/model_index.json                  {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                                           "scheduler": ["diffusers", "DDPMScheduler"]}
    OUT/unet/config.json                  UNet2DModel's config (model/pretrained.py)
    OUT/unet/diffusion_pytorch_model.safetensors   the EMA weights by default (use_ema=False: the raw ones)
    OUT/scheduler/scheduler_config.json   DDPMScheduler: the run's schedule and minidiff's sampling options
    OUT/minidiff.json                     conditioning, tokenizer, class names: what diffusers has no place for

DDPMPipeline.from_pretrained(OUT) and DDIMPipeline.from_pretrained(OUT) (which turns the scheduler into a
DDIMScheduler) load it. A text-conditioned run has no diffusers twin: its unet/config.json names
TEXT_UNET_CLASS, which minidiff reads back and diffusers refuses (docs/oracle.md: what to add).

The folder is written beside OUT under a temporary name and renamed into place, so a failed export
leaves nothing half-written; an existing OUT is replaced only with force=True, and only when it is itself
a pipeline folder (never a folder of something else).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ..diffusion.schedule import make_schedule
from ..files import fsync_dir, write_atomic
from ..model.pretrained import TEXT_UNET_CLASS, save_pretrained
from .bundle import bundle_from_meta, load_run
from .pipelines import MINIDIFF_META, MODEL_INDEX, SAMPLER_FIELDS, SCHEDULE_FIELDS, SCHEDULER_CONFIG, \
    is_diffusers_folder

META_FORMAT = 1  # minidiff.json's "format"


def scheduler_config(bundle) -> dict:
    """DDPMScheduler's scheduler_config.json for a Bundle: its schedule (by name when make_schedule rebuilds it
    from the name with diffusers' beta_start/beta_end, else as trained_betas), prediction type and sampling
    options (minidiff samples with clip_sample=True)."""
    s = bundle.schedule
    d = dict(SCHEDULE_FIELDS, num_train_timesteps=s.num_train_timesteps)
    if s.beta_schedule != "trained" and (make_schedule(s.num_train_timesteps, s.beta_schedule).betas == s.betas).all():
        d["beta_schedule"] = s.beta_schedule
    else:
        d["trained_betas"] = s.betas.tolist()
    sampler = dict(SAMPLER_FIELDS, clip_sample=True, **bundle.sampler_options)
    sampler.pop("set_alpha_to_one")  # a DDIMScheduler field; DDIMPipeline's conversion takes its default, True
    return dict(_class_name="DDPMScheduler", prediction_type=bundle.prediction_type, thresholding=False, **d, **sampler)


def _check_out(out: Path, force: bool) -> None:
    """Refuse an --out that exists unless force, and even with force unless it is a pipeline folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {str(out)!r} is a file; pass a folder name")
    if not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(f"--out {str(out)!r} exists; pass --force to replace it")
    if not (out / MODEL_INDEX).is_file():
        raise FileExistsError(f"--out {str(out)!r} is a folder without {MODEL_INDEX}: --force replaces an earlier "
                              "export only, never a folder of something else")


def _write_json(path: Path, d: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(d, indent=2, sort_keys=True) + "\n").encode())  # fsync'ed before the folder swap


def export_pipeline(checkpoint, out, use_ema: bool = True, force: bool = False) -> Path:
    """Write the run (directory or checkpoint file) at checkpoint as a diffusers pipeline folder at out.

    use_ema: the EMA weights (default) or the raw ones. Weights keep the run's dtype (float32 or float64).
    Returns the Path of out. FileExistsError for an existing out (see _check_out)."""
    if is_diffusers_folder(checkpoint):
        raise ValueError(f"{checkpoint} is already a diffusers folder; pass a minidiff run as --checkpoint")
    out = Path(out).expanduser()
    _check_out(out, force)
    arrays, meta = load_run(checkpoint)
    if not use_ema and "params" not in arrays:
        raise ValueError(f"{checkpoint} holds no raw weights (params/); drop --no-ema")
    src = arrays["ema"] if use_ema and "ema" in arrays else arrays["params"]
    bundle = bundle_from_meta(arrays, meta, use_ema, dtype=str(next(iter(src.values())).dtype))
    text = bundle.config.cross_attention_dim is not None
    index = dict(_class_name="DDPMPipeline", unet=["minidiff" if text else "diffusers",
                                                     TEXT_UNET_CLASS if text else "UNet2DModel"],
                 scheduler=["diffusers", "DDPMScheduler"])
    own = dict(format=META_FORMAT, conditioning=bundle.conditioning, num_classes=bundle.num_classes,
               class_names=bundle.class_names, tokenizer=bundle.tokenizer.to_dict() if bundle.tokenizer else None,
               weights="ema" if use_ema and "ema" in arrays else "raw", step=meta.get("step"),
               source=str(Path(checkpoint).expanduser().resolve()))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_pretrained(bundle.params, bundle.config, tmp / "unet", allow_text=True)
        _write_json(tmp / SCHEDULER_CONFIG, scheduler_config(bundle))
        _write_json(tmp / MINIDIFF_META, own)
        _write_json(tmp / MODEL_INDEX, index)
        if out.exists():  # an empty folder, or an earlier export with force: swap, then delete the old one
            old = out.with_name(tmp.name + ".old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)  # the folder's rename itself reaches the disk (its files were fsync'ed as written)
    return out
