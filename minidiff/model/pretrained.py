"""U-Net weights in and out, together with their config, and never through pickle.

    path.npz           np.savez: one array per state-dict key, plus "__config__" (a 0-d unicode
                       array holding the UNetConfig as JSON); read back with allow_pickle=False
    path.safetensors   safetensors' NumPy API; the config JSON in the header metadata
                       ("minidiff_config")
    any other path     a diffusers UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors
                       (what UNet2DModel.save_pretrained writes and from_pretrained reads); a text model
                       (cross-attention, no UNet2DModel twin) writes _class_name TEXT_UNET_CLASS there

Every file is written to a temporary file in the same folder and then moved over the target with
os.replace, so a failed save never leaves a half-written file or corrupts an existing one.

Shape legend: none; arrays keep the shapes of unet.param_shapes(config).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from .config import UNetConfig, from_diffusers_config, to_diffusers_config
from .params import param_shapes

CONFIG_KEY = "__config__"  # the npz entry that holds the config JSON
METADATA_KEY = "minidiff_config"  # the safetensors metadata entry that holds the config JSON
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SAFETENSORS_HINT = "pip install 'minidiff[safetensors]'"
TEXT_UNET_CLASS = "MinidiffTextUNet2DModel"  # config.json _class_name of a text model: not a diffusers class
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # torch.save / pickle files: never loaded
CONVERT_HINT = ("convert it once, where you trust the file, with diffusers: "
                "UNet2DModel.from_pretrained(FOLDER).save_pretrained(FOLDER, safe_serialization=True) "
                "(a pipeline: DDPMPipeline.from_pretrained(FOLDER).save_pretrained(FOLDER))")


def refuse_pickle(path: Path) -> None:
    """ValueError naming path when it is a pickled weight file (.bin, .pt, ...): loading one can run code."""
    raise ValueError(f"{str(path)!r} is a pickle (torch.save); minidiff reads .npz, .safetensors and diffusers "
                     f"folders, never pickles: {CONVERT_HINT}")


def read_json(path: Path) -> dict:
    """The JSON object in path; a missing, malformed or non-object file is a one-line ValueError naming it."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {str(err).splitlines()[0]}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, got {type(d).__name__}")
    return d


def read_safetensors(path: Path) -> dict:
    """{name: np.ndarray} of a .safetensors file; a truncated or malformed file is a ValueError naming it."""
    stn = _safetensors_numpy()
    try:
        return stn.load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError (and others) on a bad header
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {str(err).splitlines()[0]}") from None


def folder_config(config: UNetConfig) -> dict:
    """config.json of a U-Net folder: UNet2DModel's config, or minidiff's own fields under TEXT_UNET_CLASS
    for a text model (diffusers has no class for it: docs/oracle.md says what a diffusers user adds)."""
    if config.cross_attention_dim is None:
        return to_diffusers_config(config)
    return dict(config.to_dict(), _class_name=TEXT_UNET_CLASS)


def config_from_folder(d: dict) -> UNetConfig:
    """Inverse of folder_config: UNetConfig from a UNet2DModel or TEXT_UNET_CLASS config dict."""
    if d.get("_class_name") == TEXT_UNET_CLASS:
        return UNetConfig.from_dict({k: v for k, v in d.items() if not k.startswith("_")})
    return from_diffusers_config(d)


def _safetensors_numpy():
    try:
        import safetensors.numpy as stn  # noqa: PLC0415  (optional dependency)
    except ImportError:
        raise ImportError(f"reading or writing .safetensors needs the safetensors package: {SAFETENSORS_HINT}"
                          ) from None
    return stn


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".npz": "npz", ".safetensors": "safetensors"}.get(suffix, "diffusers")


def _check_params(params, config: UNetConfig) -> dict:
    """Host copies of params after checking they are exactly param_shapes(config); ValueError otherwise."""
    if not isinstance(config, UNetConfig):
        raise ValueError(f"config must be a UNetConfig, got {type(config).__name__}")
    shapes = param_shapes(config)
    if not isinstance(params, dict) or set(params) != set(shapes):
        got = set(params) if isinstance(params, dict) else set()
        raise ValueError(f"params must hold exactly the keys of param_shapes(config); missing "
                         f"{sorted(set(shapes) - got)[:3]}, unexpected {sorted(got - set(shapes))[:3]}")
    out = {}
    for key, shape in shapes.items():
        a = np.ascontiguousarray(to_numpy(params[key]))
        if a.shape != shape or a.dtype not in (np.float32, np.float64):
            raise ValueError(f"params[{key!r}] must be float32/float64 of shape {shape}, got {a.dtype} {a.shape}")
        out[key] = a
    return out


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path) into a temporary file next to path, then os.replace it onto path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(params: dict, config: UNetConfig, path, allow_text: bool = False) -> Path:
    """Write params with their config to path (.npz, .safetensors, or a diffusers folder).

    Inputs:  params {key: array} (NumPy or CuPy; stored as NumPy), exactly param_shapes(config);
             config the UNetConfig; path a str or Path (its suffix picks the format).
    Returns: the Path written. Raises ValueError on mismatched params or, for a diffusers
             folder, on a config UNet2DModel cannot express (cross_attention_dim) unless allow_text
             (then config.json names TEXT_UNET_CLASS: minidiff reads it, diffusers has no such class).
    """
    path = Path(path)
    arrays = _check_params(params, config)
    kind = _kind(path)
    if kind == "npz":
        blob = dict(arrays)
        blob[CONFIG_KEY] = np.array(config.to_json())  # 0-d unicode array: no pickle needed

        def write(tmp):
            with open(tmp, "wb") as f:  # a file object, so np.savez does not append ".npz"
                np.savez(f, **blob)
        _write_atomic(path, write)
    elif kind == "safetensors":
        stn = _safetensors_numpy()
        _write_atomic(path, lambda tmp: stn.save_file(arrays, tmp, metadata={METADATA_KEY: config.to_json()}))
    else:
        if path.exists() and not path.is_dir():
            raise ValueError(f"path {str(path)!r} is a file; a diffusers model is a folder (or use .npz / "
                             ".safetensors)")
        config_json = json.dumps(folder_config(config) if allow_text else to_diffusers_config(config), indent=2,
                                 sort_keys=True)
        stn = _safetensors_numpy()
        path.mkdir(parents=True, exist_ok=True)
        _write_atomic(path / DIFFUSERS_WEIGHTS, lambda tmp: stn.save_file(arrays, tmp, metadata={"format": "pt"}))
        _write_atomic(path / DIFFUSERS_CONFIG, lambda tmp: Path(tmp).write_text(config_json))
    return path


def _finish(arrays: dict, config: UNetConfig, source: str, dtype) -> dict:
    """Check the loaded arrays against param_shapes(config) and return them in that order."""
    shapes = param_shapes(config)
    missing, extra = sorted(set(shapes) - set(arrays)), sorted(set(arrays) - set(shapes))
    if missing or extra:
        raise ValueError(f"{source} does not match its config: missing keys {missing[:3]}, unexpected {extra[:3]}")
    params = {}
    for key, shape in shapes.items():
        a = arrays[key]
        if a.shape != shape:
            raise ValueError(f"{source}: {key!r} has shape {a.shape}, its config needs {shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{source}: {key!r} has dtype {a.dtype}, a float is needed")
        target = dtype if dtype is not None else (a.dtype if a.dtype in (np.float32, np.float64) else np.float32)
        params[key] = a.astype(target, copy=False)
    return params


def load_pretrained(path, dtype=None) -> tuple:
    """Read (params, config) written by save_pretrained, or a diffusers UNet2DModel folder.

    Inputs:  path (.npz, .safetensors, or a folder with config.json and
             diffusion_pytorch_model.safetensors); dtype None (keep float32/float64; float16 -> float32)
             or float32 / float64.
    Returns: params {key: np.ndarray} in param_shapes order, config UNetConfig.
    A diffusers config minidiff cannot build raises ValueError naming the field.
    """
    path = Path(path)
    if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be None, float32 or float64, got {dtype!r}")
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    kind = "diffusers" if path.is_dir() else _kind(path)
    if kind == "npz":
        with np.load(path, allow_pickle=False) as f:
            if CONFIG_KEY not in f.files:
                raise ValueError(f"{str(path)!r} holds no {CONFIG_KEY!r} entry: not written by save_pretrained")
            config = UNetConfig.from_json(str(f[CONFIG_KEY]))
            arrays = {k: f[k] for k in f.files if k != CONFIG_KEY}
    elif kind == "safetensors":
        stn = _safetensors_numpy()
        from safetensors import safe_open  # noqa: PLC0415  (present: _safetensors_numpy checked)

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        if METADATA_KEY not in meta:
            raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata: not written by save_pretrained "
                             "(for a diffusers model, pass its folder)")
        config = UNetConfig.from_json(meta[METADATA_KEY])
        arrays = stn.load_file(str(path))
    elif path.is_dir():
        if not (path / DIFFUSERS_CONFIG).is_file():
            raise ValueError(f"folder {str(path)!r} has no {DIFFUSERS_CONFIG}: not a diffusers model folder")
        if not (path / DIFFUSERS_WEIGHTS).is_file():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                refuse_pickle(path / pickles[0])
            raise ValueError(f"folder {str(path)!r} has no {DIFFUSERS_WEIGHTS}")
        d = read_json(path / DIFFUSERS_CONFIG)
        try:
            config = config_from_folder(d)
        except ValueError as err:
            raise ValueError(f"{str(path / DIFFUSERS_CONFIG)!r}: {err}") from None
        arrays = read_safetensors(path / DIFFUSERS_WEIGHTS)
    else:
        raise ValueError(f"path {str(path)!r} must end in .npz or .safetensors, or be a diffusers model folder")
    return _finish(arrays, config, repr(str(path)), dtype), config
