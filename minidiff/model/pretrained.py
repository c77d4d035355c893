"""U-Net weights in and out, together with their config, and never through pickle.

    path.npz           np.savez: one array per state-dict key, plus "__config__" (a 0-d unicode
                       array holding the UNetConfig as JSON); read back with allow_pickle=False
    path.safetensors   written with safetensors' NumPy API, read by safetensors_file.py; the config
                       JSON in the header metadata ("minidiff_config")
    any other path     a diffusers UNet2DModel folder: config.json + diffusion_pytorch_model.safetensors
                       (what UNet2DModel.save_pretrained writes and from_pretrained reads); a text model
                       (cross-attention, no UNet2DModel twin) writes _class_name TEXT_UNET_CLASS there

Every file is written to a temporary file in the same folder, fsync'ed, and then moved over the target with
os.replace (files.write_atomic), so a failed save never leaves a half-written file or corrupts an existing one.

Reading trusts no file: declared sizes are checked before anything is allocated (.npy headers against
their zip entries: npz_file.py; the safetensors header against the file: safetensors_file.py; the config
against config.LIMITS), names and shapes against the config before any weight is read; each failure is one
ValueError line naming the file.

Shape legend: none; arrays keep the shapes of unet.param_shapes(config).
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..files import write_atomic
from .config import UNetConfig, from_diffusers_config, to_diffusers_config
from .npz_file import npy_headers, read_member
from .params import param_shapes
from .safetensors_file import read_header, read_safetensors, read_tensors  # noqa: F401 (read_safetensors: API)

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
MAX_JSON_BYTES = 16 * 2**20  # 16 MiB: the largest JSON file read (a config.json is a few KB)


def refuse_pickle(path: Path) -> None:
    """ValueError naming path when it is a pickled weight file (.bin, .pt, ...): loading one can run code."""
    raise ValueError(f"{str(path)!r} is a pickle (torch.save); minidiff reads .npz, .safetensors and diffusers "
                     f"folders, never pickles: {CONVERT_HINT}")


def read_json(path: Path) -> dict:
    """The JSON object in path (at most MAX_JSON_BYTES); a missing, malformed, oversized or non-object file
    is a one-line ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        why = "it is not a regular file" if path.exists() else "it does not exist"
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(min(os.fstat(f.fileno()).st_size, MAX_JSON_BYTES) + 1)  # read(n) allocates n bytes
            if len(data) > MAX_JSON_BYTES:
                raise ValueError(f"it is larger than {MAX_JSON_BYTES:,} bytes (MAX_JSON_BYTES)")
            d = json.loads(data.decode("utf-8"))
            why = None if isinstance(d, dict) else f"it must hold a JSON object, got {type(d).__name__}"
        except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
            why = getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]
    if why:
        raise ValueError(f"{str(path)!r} is not a readable JSON file: {why}")
    return d


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
        raise ImportError(f"writing .safetensors needs the safetensors package: {SAFETENSORS_HINT}") from None
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
    if kind in ("npz", "safetensors"):
        path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "npz":
        blob = dict(arrays)
        blob[CONFIG_KEY] = np.array(config.to_json())  # 0-d unicode array: no pickle needed
        write_atomic(path, lambda f: np.savez(f, **blob))
    elif kind == "safetensors":
        stn = _safetensors_numpy()
        write_atomic(path, lambda f: f.write(stn.save(arrays, metadata={METADATA_KEY: config.to_json()})))
    else:
        if path.exists() and not path.is_dir():
            raise ValueError(f"path {str(path)!r} is a file; a diffusers model is a folder (or use .npz / "
                             ".safetensors)")
        config_json = json.dumps(folder_config(config) if allow_text else to_diffusers_config(config), indent=2,
                                 sort_keys=True)
        stn = _safetensors_numpy()
        path.mkdir(parents=True, exist_ok=True)
        write_atomic(path / DIFFUSERS_WEIGHTS, lambda f: f.write(stn.save(arrays, metadata={"format": "pt"})))
        write_atomic(path / DIFFUSERS_CONFIG, config_json.encode())
    return path


def _parse_config(text: str, source: str) -> UNetConfig:
    """UNetConfig from its JSON text; a malformed or impossible config is one line naming source."""
    try:
        return UNetConfig.from_json(text)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{source}: {(str(err).splitlines() or [type(err).__name__])[0]}") from None


def _match(declared: dict, config: UNetConfig, source: str) -> None:
    """Check {name: (shape, is_float)} read from a file's header is exactly param_shapes(config), before any
    weight is read; a ValueError names the first name that differs."""
    shapes = param_shapes(config)
    missing, extra = sorted(set(shapes) - set(declared)), sorted(set(declared) - set(shapes))
    if missing or extra:
        parts = [f"missing keys {missing[:3]} ({len(missing)} in all)"] if missing else []
        parts += [f"unexpected keys {[k[:80] for k in extra[:3]]} ({len(extra)} in all)"] if extra else []
        raise ValueError(f"{source} does not match its config: {'; '.join(parts)}")
    for key, shape in shapes.items():
        if tuple(declared[key][0]) != shape:
            raise ValueError(f"{source}: {key!r} has shape {tuple(declared[key][0])}, its config needs {shape}")
        if not declared[key][1]:
            raise ValueError(f"{source}: {key!r} is not a float array (a float is needed)")


def _finish(arrays: dict, config: UNetConfig, source: str, dtype) -> dict:
    """The arrays in param_shapes order as dtype (None: float32/64 kept, else float32), all checked finite."""
    params = {}
    for key in param_shapes(config):
        a = arrays[key]
        if not np.isfinite(a).all():
            raise ValueError(f"{source}: weight {key!r} holds NaN or inf (a diverged model); use another file")
        target = dtype if dtype is not None else (a.dtype if a.dtype in (np.float32, np.float64) else np.float32)
        params[key] = a.astype(target, copy=False)
    return params


def _read_npz(path: Path) -> tuple:
    """(arrays, config) of an .npz written by save_pretrained: headers, config and names checked first."""
    source = repr(str(path))
    try:
        with zipfile.ZipFile(path) as zf:
            heads = npy_headers(zf, path)  # {name: (entry, shape, dtype)}, every declared size checked
            if CONFIG_KEY not in heads:
                raise LookupError(f"it holds no {CONFIG_KEY!r} entry: not written by save_pretrained")
            if heads[CONFIG_KEY][1] != () or heads[CONFIG_KEY][2].kind != "U":
                raise ValueError(f"its {CONFIG_KEY!r} entry is not a string")
            config = _parse_config(str(read_member(zf, heads[CONFIG_KEY][0])), f"{source} {CONFIG_KEY!r}")
            _match({k: (s, d.kind == "f") for k, (_, s, d) in heads.items() if k != CONFIG_KEY}, config, source)
            arrays = {k: read_member(zf, heads[k][0]) for k in param_shapes(config)}
    except (OSError, EOFError, LookupError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
        raise ValueError(f"{source} is not a readable .npz file: {(str(err).splitlines() or [''])[0]}") from None
    except ValueError as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(msg if msg.startswith(source) else f"{source} is not a readable .npz file: {msg}") from None
    return arrays, config


def _read_weights(path: Path, config: UNetConfig, header=None) -> dict:
    """The arrays of a .safetensors file after checking its header (read_header's) against config."""
    header = header or read_header(path)
    _match({k: (e.shape, e.dtype in ("F16", "BF16", "F32", "F64")) for k, e in header.entries.items()}, config,
           repr(str(path)))
    return read_tensors(path, header, param_shapes(config))


def load_pretrained(path, dtype=None) -> tuple:
    """Read (params, config) written by save_pretrained, or a diffusers UNet2DModel folder.

    Inputs:  path (.npz, .safetensors, or a folder with config.json and diffusion_pytorch_model.safetensors);
             dtype None (keep float32/float64; float16, bfloat16 -> float32) or float32 / float64.
    Returns: params {key: np.ndarray} in param_shapes order, config UNetConfig.
    Raises FileNotFoundError for a missing path; a malformed file, a config minidiff cannot build or weights
    that do not fit it are one ValueError line naming the file and the field."""
    path = Path(path)
    if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
        raise ValueError(f"dtype must be None, float32 or float64, got {dtype!r}")
    if not path.exists():
        raise FileNotFoundError(f"path {str(path)!r} does not exist")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        refuse_pickle(path)
    kind = "diffusers" if path.is_dir() else _kind(path)
    if kind == "npz":
        arrays, config = _read_npz(path)
    elif kind == "safetensors":
        header = read_header(path)
        meta = header.metadata
        if METADATA_KEY not in meta:
            raise ValueError(f"{str(path)!r} has no {METADATA_KEY!r} metadata: not written by save_pretrained "
                             "(for a diffusers model, pass its folder)")
        config = _parse_config(meta[METADATA_KEY], f"{str(path)!r} metadata {METADATA_KEY!r}")
        arrays = _read_weights(path, config, header)
    elif path.is_dir():
        if not (path / DIFFUSERS_CONFIG).is_file():
            raise ValueError(f"folder {str(path)!r} has no {DIFFUSERS_CONFIG}: not a diffusers model folder")
        if not (path / DIFFUSERS_WEIGHTS).exists():
            pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
            if pickles:
                refuse_pickle(path / pickles[0])
            raise ValueError(f"folder {str(path)!r} has no {DIFFUSERS_WEIGHTS}")
        d = read_json(path / DIFFUSERS_CONFIG)
        try:
            config = config_from_folder(d)
        except ValueError as err:
            raise ValueError(f"{str(path / DIFFUSERS_CONFIG)!r}: {err}") from None
        path = path / DIFFUSERS_WEIGHTS  # the file the weights' errors name
        arrays = _read_weights(path, config)
    else:
        raise ValueError(f"path {str(path)!r} must end in .npz or .safetensors, or be a diffusers model folder")
    return _finish(arrays, config, repr(str(path)), dtype), config
