"""What a diffusion-model checkpoint's metadata and arrays must hold, checked field by field before use.

Trainer.save writes (run_state.py): train_config, model_config, conditioning, num_classes, class_names,
tokenizer, ops, step, losses, rng, ema_num_updates, opt_step, and the arrays params/, ema/, opt/exp_avg/,
opt/exp_avg_sq/ under the model's state-dict names. Sampling, eval and export (bundle.load_run) read the
first group and the weights; --resume reads everything. A missing field, a wrong type, an unknown value or
an array of the wrong shape is one ValueError naming the file and the field. The same holds for a classifier
checkpoint (check_classifier_meta) and for the eval classifier that eval saves (check_eval_classifier).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import numpy as np

from ..data.dataset import MAX_CLASSES
from ..data.tokenizer import Tokenizer
from ..diffusion.schedule import BETA_SCHEDULES, PREDICTION_TYPES
from ..model.classifier import classifier_param_shapes
from ..model.config import UNetConfig
from ..model.params import param_shapes
from .checkpoint import rng_from_state
from .config import TRAIN_VARIANCE_TYPES, TrainConfig

MAX_TIMESTEPS = 1_000_000  # num_train_timesteps a checkpoint may declare (the schedule has that many entries)
CONDITIONINGS = ("text", "class", "none")
# train_config fields read without a default (older checkpoints lack some newer fields: those take the default)
REQUIRED = ("data", "num_train_timesteps", "beta_schedule", "prediction_type")
CHOICES = {"beta_schedule": BETA_SCHEDULES, "prediction_type": PREDICTION_TYPES, "variance_type": TRAIN_VARIANCE_TYPES,
           "optimizer": ("adam", "adamw"), "dtype": ("float32", "float64"),
           "conditioning": ("text", "class", "none", "auto")}
_TYPES = typing.get_type_hints(TrainConfig)


ADVICE = "it is damaged or was not written by minidiff train (or train-classifier): use another checkpoint"
EVAL_CLASSIFIER_ADVICE = ("it is damaged or was edited: delete its folder (eval trains it again) or pass another "
                          "--eval-classifier folder")


class BadMeta(ValueError):
    """One line: the file, the field and what is wrong with it (and what to do: advice)."""

    def __init__(self, path, field: str, problem: str, advice: str = ADVICE):
        super().__init__(f"checkpoint {str(path)!r}: {field} {problem}; {advice}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_train_config(saved, path) -> dict:
    """The checkpoint's train_config with TrainConfig's defaults for the fields it lacks, each field's type and
    value checked (BadMeta naming it)."""
    if not isinstance(saved, dict):
        raise BadMeta(path, "train_config", f"must be a JSON object, got {type(saved).__name__}")
    for name in REQUIRED:
        if name not in saved:
            raise BadMeta(path, f"train_config.{name}", "is missing")
    full = dataclasses.asdict(TrainConfig()) | {k: v for k, v in saved.items() if k in _TYPES}
    for name, value in full.items():
        want = _TYPES[name]
        ok = (isinstance(value, bool) if want is bool else _is_int(value) if want is int else
              (_is_int(value) or isinstance(value, float)) and math.isfinite(value) if want is float else
              isinstance(value, str))
        if not ok:
            raise BadMeta(path, f"train_config.{name}", f"must be {want.__name__}, got {value!r:.80}")
        if name in CHOICES and value not in CHOICES[name]:
            raise BadMeta(path, f"train_config.{name}", f"must be one of {list(CHOICES[name])}, got {value!r:.80}")
    if not 1 <= full["num_train_timesteps"] <= MAX_TIMESTEPS:
        raise BadMeta(path, "train_config.num_train_timesteps", f"must be in [1, {MAX_TIMESTEPS:,}], "
                      f"got {full['num_train_timesteps']}")
    return full


def check_model_meta(meta: dict, path) -> UNetConfig:
    """The U-Net config of a diffusion-model checkpoint's metadata, after checking train_config, model_config,
    conditioning, num_classes, class_names, tokenizer and step (BadMeta naming the first bad field)."""
    check_train_config(meta.get("train_config"), path)
    if not isinstance(meta.get("model_config"), dict):
        raise BadMeta(path, "model_config", f"must be a JSON object, got {meta.get('model_config')!r:.80}")
    try:
        config = UNetConfig.from_dict(meta["model_config"])
    except (ValueError, TypeError) as err:
        raise BadMeta(path, "model_config", f"is not a U-Net config ({err})") from None
    cond = meta.get("conditioning", "<missing>")
    if cond not in CONDITIONINGS:
        raise BadMeta(path, "conditioning", f"must be one of {list(CONDITIONINGS)}, got {cond!r:.80}")
    k = meta.get("num_classes", 0)
    if not (_is_int(k) and 0 <= k <= MAX_CLASSES):
        raise BadMeta(path, "num_classes", f"must be an int in [0, {MAX_CLASSES}], got {k!r:.80}")
    if cond == "class" and not (1 <= k < (config.num_class_embeds or 0) + 1):
        raise BadMeta(path, "num_classes", f"must be >= 1 and at most the model's num_class_embeds "
                      f"({config.num_class_embeds}) for a class-conditioned model, got {k}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == k
                                  and all(isinstance(s, str) for s in names)):
        raise BadMeta(path, "class_names", f"must be null or num_classes ({k}) strings, got {names!r:.80}")
    tok = meta.get("tokenizer")
    if cond == "text" and tok is None:
        raise BadMeta(path, "tokenizer", "is missing (a text-conditioned model needs its vocabulary)")
    if tok is not None:
        try:
            Tokenizer.from_dict(tok)
        except (ValueError, TypeError, AttributeError) as err:
            raise BadMeta(path, "tokenizer", f"is not a tokenizer ({str(err)[:120]})") from None
    if not (_is_int(meta.get("step")) and meta["step"] >= 0):
        raise BadMeta(path, "step", f"must be an int >= 0, got {meta.get('step', '<missing>')!r:.80}")
    return config


def check_arrays(arrays: dict, config: UNetConfig, path, groups=("params",), shapes=None, advice=ADVICE) -> None:
    """Each group of arrays (params, ema, opt/exp_avg, ...; `groups` required, ema checked when present) holds
    exactly the model's state-dict names (or those of `shapes`), each a float array of its shape (BadMeta naming
    the first that does not)."""
    shapes = param_shapes(config) if shapes is None else shapes
    for group in dict.fromkeys((*groups, "ema") if "ema" in arrays else groups):
        node = arrays
        for part in group.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise BadMeta(path, f"arrays {group}/", "are missing", advice)
        if set(node) != set(shapes):
            extra, lack = sorted(set(node) - set(shapes)), sorted(set(shapes) - set(node))
            raise BadMeta(path, f"arrays {group}/", f"do not match model_config (missing {lack[:3]}, unexpected "
                          f"{extra[:3]})", advice)
        for name, shape in shapes.items():
            v = node[name]
            if not isinstance(v, np.ndarray) or v.shape != tuple(shape) or not np.issubdtype(v.dtype, np.floating):
                raise BadMeta(path, f"array {group}/{name}", f"must be a float array of shape {tuple(shape)}, got "
                              f"{getattr(v, 'dtype', type(v).__name__)} {getattr(v, 'shape', '')}", advice)


def check_finite_weights(arrays: dict, path) -> None:
    """ValueError naming the file and the array if a checkpoint's weights or EMA weights are not all finite."""
    for group in ("params", "ema"):
        for k, v in (arrays.get(group) or {}).items():
            if not np.isfinite(v).all():
                raise ValueError(f"{path}: the checkpoint's {group} {k!r} are not finite (a diverged run); "
                                 "use an earlier checkpoint or train again with a lower --lr or --grad-clip")


def check_resume_meta(meta: dict, path) -> np.random.Generator:
    """The training rng of a checkpoint to resume, after checking what only --resume reads: rng, losses (one
    finite number per step), ema_num_updates, opt_step and the ops record (BadMeta naming the first bad field)."""
    step = meta["step"]
    losses = meta.get("losses")
    if not (isinstance(losses, list) and len(losses) == step and
            all((_is_int(v) or isinstance(v, float)) and math.isfinite(v) for v in losses)):
        raise BadMeta(path, "losses", f"must be a list of step ({step}) finite numbers, got {str(losses)[:80]}")
    for name in ("ema_num_updates", "opt_step"):
        if not (_is_int(meta.get(name)) and meta[name] >= 0):
            raise BadMeta(path, name, f"must be an int >= 0, got {meta.get(name, '<missing>')!r:.80}")
    ops = meta.get("ops")  # older checkpoints have none, or none with a device (a CPU run's)
    if ops is not None and not (isinstance(ops, dict) and set(ops) - {"device"} == {"name", "shards"} and
                                isinstance(ops["name"], str) and _is_int(ops["shards"]) and ops["shards"] >= 1 and
                                ops.get("device", "cpu") in ("cpu", "gpu")):
        raise BadMeta(path, "ops", f"must be {{'name': str, 'shards': int >= 1, 'device': 'cpu' | 'gpu'}}, got "
                                   f"{ops!r:.80}")
    if "rng" not in meta:
        raise BadMeta(path, "rng", "is missing (the training generator's state)")
    try:
        return rng_from_state(meta["rng"])
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, AttributeError) as err:
        raise BadMeta(path, "rng", f"is not a generator state ({type(err).__name__}: {str(err)[:100]})") from None


def check_classifier_meta(meta: dict, path) -> tuple:
    """(UNetConfig, K) of a classifier checkpoint (minidiff train-classifier) after checking model_config,
    num_classes, class_names and train_config's num_train_timesteps and beta_schedule (BadMeta naming the field)."""
    t = meta.get("train_config")
    if not isinstance(t, dict):
        raise BadMeta(path, "train_config", f"must be a JSON object, got {t!r:.80}")
    if not (_is_int(t.get("num_train_timesteps")) and 1 <= t["num_train_timesteps"] <= MAX_TIMESTEPS):
        raise BadMeta(path, "train_config.num_train_timesteps", f"must be an int in [1, {MAX_TIMESTEPS:,}], got "
                      f"{t.get('num_train_timesteps', '<missing>')!r:.80}")
    if t.get("beta_schedule") not in BETA_SCHEDULES:
        raise BadMeta(path, "train_config.beta_schedule", f"must be one of {list(BETA_SCHEDULES)}, got "
                      f"{t.get('beta_schedule', '<missing>')!r:.80}")
    try:
        config = UNetConfig.from_dict(meta.get("model_config"))
    except (ValueError, TypeError, AttributeError) as err:
        raise BadMeta(path, "model_config", f"is not a U-Net config ({str(err)[:120]})") from None
    k = meta.get("num_classes", "<missing>")
    if not (_is_int(k) and 1 <= k <= MAX_CLASSES):
        raise BadMeta(path, "num_classes", f"must be an int in [1, {MAX_CLASSES}], got {k!r:.80}")
    names = meta.get("class_names")
    if names is not None and not (isinstance(names, list) and len(names) == k
                                  and all(isinstance(s, str) for s in names)):
        raise BadMeta(path, "class_names", f"must be null or num_classes ({k}) strings, got {names!r:.80}")
    return config, k


def check_eval_classifier(arrays: dict, meta: dict, path) -> tuple:
    """(UNetConfig, class names) of a saved eval classifier (eval_classifier.py) after checking kind, key,
    model_config, class_names, heldout_n, heldout_accuracy and the arrays params/ (the classifier's shapes) and
    heldout/mu (Cl,), heldout/sigma (Cl, Cl), finite (BadMeta naming the first bad field)."""
    def bad(field, problem):
        return BadMeta(path, field, problem, EVAL_CLASSIFIER_ADVICE)

    if meta.get("kind") != "eval_classifier":
        raise ValueError(f"{str(path)!r} is not an eval classifier (kind {meta.get('kind', '<missing>')!r:.40}); "
                         "pass another --eval-classifier folder")
    key = meta.get("key")
    if not (isinstance(key, dict) and set(key) == {"data", "n"} and isinstance(key["data"], str) and _is_int(key["n"])):
        raise bad("key", f"must be {{'data': str, 'n': int}}, got {key!r:.80}")
    try:
        config = UNetConfig.from_dict(meta.get("model_config"))
    except (ValueError, TypeError, AttributeError) as err:
        raise bad("model_config", f"is not a U-Net config ({str(err)[:120]})") from None
    names = meta.get("class_names")
    if not (isinstance(names, list) and 2 <= len(names) <= MAX_CLASSES and all(isinstance(s, str) for s in names)):
        raise bad("class_names", f"must be a list of 2 to {MAX_CLASSES} strings, got {names!r:.80}")
    try:
        shapes = classifier_param_shapes(config, len(names))
    except ValueError as err:
        raise bad("model_config", f"is not a classifier's ({str(err)[:120]})") from None
    if not (_is_int(meta.get("heldout_n")) and meta["heldout_n"] >= 1):
        raise bad("heldout_n", f"must be an int >= 1, got {meta.get('heldout_n', '<missing>')!r:.80}")
    acc = meta.get("heldout_accuracy", "<missing>")
    if not ((_is_int(acc) or isinstance(acc, float)) and 0 <= acc <= 1):  # NaN fails 0 <= acc
        raise bad("heldout_accuracy", f"must be a number in [0, 1], got {acc!r:.80}")
    check_arrays(arrays, config, path, ("params",), shapes, EVAL_CLASSIFIER_ADVICE)
    cl = config.block_out_channels[-1]
    check_arrays(arrays, config, path, ("heldout",), {"mu": (cl,), "sigma": (cl, cl)}, EVAL_CLASSIFIER_ADVICE)
    for group in ("params", "heldout"):
        for name, v in arrays[group].items():
            if not np.isfinite(v).all():
                raise bad(f"array {group}/{name}", "is not finite")
    return config, names
