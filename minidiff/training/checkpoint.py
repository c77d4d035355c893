"""Training checkpoints: one .npz of arrays plus JSON metadata, written atomically, read without pickle.

Shape legend: none; arrays keep their own shapes. Arrays come back as NumPy (move them with
backend.to_device).

Layout of the file (np.savez, every member a plain .npy, loaded with allow_pickle=False):
    "params/<state-dict name>"            model weights
    "ema/<name>"                          EMA weights
    "opt/exp_avg/<name>", ...             any nesting: nested dicts are joined with "/"
    "__meta__"                            0-d unicode array holding json.dumps(meta)
meta holds the rest: configs, step, rng state (rng_state), tokenizer vocab, loss history, ...

Atomic write (files.write_atomic): the bytes go to "<path>.tmp-<pid>" in the same folder, are flushed and
fsync'ed, and only then os.replace(tmp, path) swaps the name, which is atomic on POSIX and Windows. A crash or
kill at any moment leaves either the old complete file or the new complete file at path.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..backend import to_numpy
from ..files import write_atomic
from ..data.npz import MAX_DATA_BYTES, TooLarge

META_KEY = "__meta__"
FORMAT = 1  # meta["checkpoint_format"]; bump when the layout changes
SEP = "/"


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"params": {"w": a}, "opt": {"exp_avg": {"w": m}}} -> {"params/w": a, "opt/exp_avg/w": m}."""
    flat = {}
    for k, v in tree.items():
        if not isinstance(k, str) or not k or SEP in k or k == META_KEY:
            raise ValueError(f"array names must be non-empty strings without {SEP!r} and not "
                             f"{META_KEY!r}, got {k!r}")
        if isinstance(v, dict):
            flat.update(flatten(v, prefix + k + SEP))
        else:
            flat[prefix + k] = v
    return flat


def unflatten(flat: dict) -> dict:
    """Inverse of flatten."""
    tree = {}
    for key, v in flat.items():
        *groups, leaf = key.split(SEP)
        node = tree
        for g in groups:
            node = node.setdefault(g, {})
        node[leaf] = v
    return tree


def _json_default(obj):
    """Let numpy scalars and small arrays into the metadata."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def save_checkpoint(path, arrays: dict, meta: dict | None = None) -> Path:
    """Write arrays (a nested dict of NumPy/CuPy arrays) and meta (JSON-able) atomically to path."""
    path = Path(path)
    flat = {k: np.asarray(to_numpy(v)) for k, v in flatten(arrays).items()}  # 0-d stays 0-d
    for k, v in flat.items():
        if v.dtype.hasobject:
            raise ValueError(f"array {k!r} has dtype object, which cannot be saved without pickle")
    meta = dict(meta or {}, checkpoint_format=FORMAT)
    try:
        text = json.dumps(meta, default=_json_default)
    except (TypeError, ValueError) as err:
        raise ValueError(f"meta must be JSON-serializable: {err}") from None
    flat[META_KEY] = np.array(text)  # 0-d unicode array
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: np.savez(f, **flat))  # files.py: fsync, os.replace, fsync folder


STEP_FILE = re.compile(r"^step_(\d{6,})\.npz$")  # the only names keep_last_checkpoints ever deletes


def keep_last_checkpoints(latest: Path, step: int, limit: int) -> Path:
    """Give latest (just written) a second name step_XXXXXX.npz beside it (a hard link: no copy where the
    file system allows), then delete the oldest step_*.npz of that folder until `limit` remain.
    Only files named step_<digits>.npz in latest's folder are deleted; latest.npz and anything else stay."""
    latest = Path(latest)
    path = latest.with_name(f"step_{step:06d}.npz")
    path.unlink(missing_ok=True)
    try:
        os.link(latest, path)  # latest.npz is replaced by os.replace later, so this name keeps these bytes
    except OSError:
        shutil.copyfile(latest, path)
    found = sorted((int(m.group(1)), p) for p in latest.parent.iterdir() if (m := STEP_FILE.match(p.name)))
    for _, old in found[:max(0, len(found) - limit)]:
        old.unlink()
    return path


class _NotCheckpoint(Exception):
    """A readable .npz that save_checkpoint did not write."""


# The most a checkpoint's members may declare in all: 4 x npz.MAX_DATA_BYTES = 8 GiB. The largest preset's
# checkpoint (ddpm-cifar10 in float64: weights, EMA and two Adam moments of 35.7M params) is 1.1 GB.
MAX_CHECKPOINT_BYTES = 4 * MAX_DATA_BYTES


def check_member_sizes(path: Path, cap: int = MAX_CHECKPOINT_BYTES) -> None:
    """TooLarge naming the file and the member if an .npy member's header declares more bytes than the member
    holds (a stored member holds them verbatim) or the members more than cap in all: read from the headers,
    before np.load allocates what a header declares (a 1 KiB file could declare 1 TiB)."""
    total = 0
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read(f)
                nbytes = math.prod(shape) * dtype.itemsize
                total += nbytes
                held = info.file_size - f.tell()
            if nbytes > held or total > cap:
                limit = (f"the member holds {held:,}" if nbytes > held
                         else f"the cap is {cap:,} in all (MAX_CHECKPOINT_BYTES)")
                raise TooLarge(f"checkpoint {str(path)!r}: member {info.filename.removesuffix('.npy')!r} declares "
                               f"{shape} {dtype} = {nbytes:,} bytes and {limit}; it is damaged or not a minidiff "
                               "checkpoint, nothing was loaded")


def load_checkpoint(path) -> tuple[dict, dict]:
    """(arrays as a nested dict of NumPy arrays, meta dict) from a file written by save_checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist; check the path (or drop --resume)")
    try:
        check_member_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            flat = {k: z[k] for k in z.files}  # read every member now, so a bad one fails here
        if META_KEY not in flat:
            raise _NotCheckpoint(f"{str(path)!r} is an .npz but not a minidiff checkpoint (no {META_KEY!r} "
                                 "entry); pass a checkpoint written by minidiff train")
        meta = json.loads(str(flat.pop(META_KEY)[()]))
        if not isinstance(meta, dict):
            raise ValueError("metadata is not a JSON object")
    except (_NotCheckpoint, TooLarge) as err:
        raise ValueError(str(err)) from None
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError, RecursionError) as err:
        raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated ({type(err).__name__}: {err}); "
                         "delete it and resume from an earlier checkpoint, or start a new run") from None
    if meta.get("checkpoint_format") != FORMAT or isinstance(meta.get("checkpoint_format"), bool):
        raise ValueError(f"checkpoint {str(path)!r} has format {meta.get('checkpoint_format')!r}, this "
                         f"minidiff reads format {FORMAT}; use the minidiff version that wrote it")
    return unflatten(flat), meta


def check_config(saved: dict, expected: dict, what: str = "model config", path=None) -> None:
    """Raise ValueError naming the first field where a checkpoint's config differs from this run's."""
    where = f"checkpoint {str(path)!r}" if path is not None else "the checkpoint"
    for key in sorted(set(saved) | set(expected), key=str):
        if key not in saved or key not in expected or saved[key] != expected[key]:
            has = saved.get(key, "<missing>")
            want = expected.get(key, "<missing>")
            raise ValueError(f"{where} was made with {what} {key}={has!r}, but this run has {key}={want!r}; "
                             "use the same settings, or start a new run in a new --out folder")


def rng_state(rng: np.random.Generator) -> dict:
    """A JSON-serializable copy of rng's bit-generator state (arrays become lists)."""
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return json.loads(json.dumps(rng.bit_generator.state, default=_json_default))


_BIT_GENERATORS = {"PCG64": np.random.PCG64, "PCG64DXSM": np.random.PCG64DXSM, "Philox": np.random.Philox,
                   "SFC64": np.random.SFC64, "MT19937": np.random.MT19937}


def _layout_differs(state, template, where: str) -> str | None:
    """Where state's nesting differs from template's (same keys, ints where ints, lists of the same length of
    ints, equal strings), or None: a state that numpy would take only after rounding or truncating is refused."""
    if isinstance(template, dict):
        if not isinstance(state, dict) or set(state) != set(template):
            return f"{where} must have the keys {sorted(template)}, got {str(state)[:60]}"
        return next((d for k in template if (d := _layout_differs(state[k], template[k], f"{where}.{k}"))), None)
    if isinstance(template, list):
        if not isinstance(state, list) or len(state) != len(template):
            return f"{where} must be a list of {len(template)} ints, got {str(state)[:60]}"
        return next((d for i, v in enumerate(state) if (d := _layout_differs(v, 0, f"{where}[{i}]"))), None)
    if isinstance(template, str):
        return None if state == template else f"{where} must be {template!r}, got {str(state)[:60]}"
    if not isinstance(state, int) or isinstance(state, bool) or state < 0:
        return f"{where} must be an int >= 0, got {str(state)[:60]}"
    return None


def rng_from_state(state: dict) -> np.random.Generator:
    """A Generator that continues exactly where the one that gave rng_state(...) stopped."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in _BIT_GENERATORS:
        raise ValueError(f"rng state must name a bit generator in {sorted(_BIT_GENERATORS)}, got {name!r}")
    bit_gen = _BIT_GENERATORS[name]()
    wrong = _layout_differs(state, rng_state(np.random.Generator(bit_gen)), "rng")
    if wrong:
        raise ValueError(f"rng state of {name} has the wrong layout: {wrong}")
    if name == "MT19937":  # its 'key' must be a uint32 array again
        state = dict(state, state=dict(state["state"], key=np.asarray(state["state"]["key"], np.uint32)))
    bit_gen.state = state
    return np.random.Generator(bit_gen)
