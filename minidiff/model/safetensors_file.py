"""Reading a .safetensors file with NumPy, every declared size checked against the file before anything is read.

The format (https://github.com/huggingface/safetensors, "Format"):

    bytes 0..8          n, the header's length: an unsigned 64-bit little-endian integer
    bytes 8..8+n        the header: a UTF-8 JSON object
                          {"__metadata__": {str: str},                     (optional)
                           NAME: {"dtype": "F32", "shape": [d0, d1, ...], "data_offsets": [begin, end]}, ...}
    bytes 8+n..         the data: tensor NAME is bytes begin..end of it, C order, little-endian;
                        the tensors tile the data exactly (no overlap, no hole, nothing after the last)

read_header checks all of that against the file's size, so a file can make us allocate no more than its
own size (plus MAX_HEADER_BYTES for the header); read_tensors then reads the validated ranges. Every
failure is one ValueError line naming the file and the field. Nothing here unpickles or runs code.

Shape legend: none; each tensor keeps the shape its header entry declares.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_HEADER_BYTES = 100 * 2**20  # 100 MiB: the largest header accepted (safetensors' own limit)
MAX_NDIM = 64  # NumPy's limit on the number of dimensions
METADATA = "__metadata__"
FIELDS = ("dtype", "shape", "data_offsets")
# safetensors dtype -> NumPy dtype (little-endian); BF16 is read as its 16 bits and widened to float32
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the header, validated: its bytes are data[begin:end]."""

    dtype: str  # a key of DTYPES
    shape: tuple
    begin: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: the tensors by name, the metadata, and where the data starts in the file."""

    entries: dict  # {name: Entry}
    metadata: dict  # {str: str}
    data_start: int  # 8 + n


def _fail(path, what: str):
    raise ValueError(f"{str(path)!r} is not a readable safetensors file: {what}")


def _no_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a name given twice is ambiguous, so refuse it (json.loads keeps the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {_short(key)} appears twice")
        out[key] = value
    return out


def _short(name) -> str:
    """repr(name) cut to 80 characters: a message stays one short line whatever a file holds."""
    text = repr(name)
    return text if len(text) <= 80 else text[:77] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _entry(path, name: str, info, data_size: int) -> Entry:
    """Entry of one header item, after checking every field (and its byte count) against data_size."""
    where = f"tensor {_short(name)}"
    if not isinstance(info, dict):
        _fail(path, f"{where} must be an object with {', '.join(FIELDS)}, got {type(info).__name__}")
    for field in FIELDS:
        if field not in info:
            _fail(path, f"{where} has no {field!r}")
    extra = sorted(set(info) - set(FIELDS))
    if extra:
        _fail(path, f"{where} has an unknown field {_short(extra[0])} (fields: {', '.join(FIELDS)})")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        _fail(path, f"{where} has dtype {_short(dtype)}; minidiff reads {', '.join(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        _fail(path, f"{where} has shape {_short(shape)}; a shape is a list of at most {MAX_NDIM} ints >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        _fail(path, f"{where} has data_offsets {_short(offsets)}; they must be [begin, end], two ints")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        _fail(path, f"{where} has data_offsets {_short(offsets)}; they must satisfy 0 <= begin <= end <= "
                    f"{data_size:,} (the data's size: the file is truncated or the offsets are wrong)")
    nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize  # Python ints: no overflow
    if end - begin != nbytes:
        size = f"{nbytes:,} bytes" if nbytes < 2**64 else "more than 2**64 bytes"
        _fail(path, f"{where} is {dtype} {_short(tuple(shape))} = {size}, but its data_offsets {_short(offsets)} "
                    f"hold {end - begin:,}")
    return Entry(dtype, tuple(shape), begin, end)


def _tiled(path, entries: dict, data_size: int) -> None:
    """Check the tensors cover data[0:data_size] exactly once, as safetensors requires (no overlap, no hole)."""
    at, last = 0, None
    for name, e in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin < at:
            _fail(path, f"tensor {_short(name)} (bytes {e.begin}..{e.end}) overlaps tensor {_short(last)} "
                        f"(ends at {at})")
        if e.begin > at:
            _fail(path, f"no tensor holds data bytes {at}..{e.begin} (a hole before tensor {_short(name)})")
        at, last = e.end, name
    if at != data_size:
        _fail(path, f"the data is {data_size:,} bytes but its tensors end at byte {at:,} (trailing bytes)")


def read_header(path) -> Header:
    """The validated Header of a .safetensors file (see the module docstring); reads no tensor data."""
    path = Path(path)
    if not path.is_file():  # a folder, a device (/dev/zero), a FIFO: nothing to read a bounded header from
        _fail(path, "it is a folder, not a file" if path.is_dir() else
              "it is not a regular file" if path.exists() else "it does not exist")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _fail(path, f"the file is {len(head)} bytes; it must start with an 8-byte header length")
            n = int.from_bytes(head, "little")
            if n == 0 or n > MAX_HEADER_BYTES:
                _fail(path, f"its header length is {n:,} bytes; it must be 1..{MAX_HEADER_BYTES:,} "
                            "(MAX_HEADER_BYTES)")
            if 8 + n > size:
                _fail(path, f"its header length is {n:,} bytes, past the end of the file ({size:,} bytes: "
                            "truncated?)")
            text = f.read(n)
    except OSError as err:
        raise ValueError(f"{str(path)!r} cannot be read: {err.strerror or err}") from None
    if len(text) != n:
        _fail(path, f"the file ended inside its {n:,}-byte header (truncated)")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as err:
        _fail(path, f"its header is not UTF-8 ({err.reason} at byte {8 + err.start})")
    except (ValueError, RecursionError) as err:  # json.JSONDecodeError is a ValueError
        _fail(path, f"its header is not valid JSON ({str(err).splitlines()[0] or type(err).__name__})")
    if not isinstance(header, dict):
        _fail(path, f"its header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop(METADATA, {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _fail(path, f"its {METADATA!r} must be an object of strings, got {_short(metadata)}")
    data_size = size - 8 - n
    entries = {name: _entry(path, name, info, data_size) for name, info in header.items()}
    _tiled(path, entries, data_size)
    return Header(entries, metadata, 8 + n)


def read_tensors(path, header: Header, names=None) -> dict:
    """{name: np.ndarray} for names (default: all) of a file whose header read_header returned.

    Each array is allocated at its validated size and filled from the file; a file that changed
    since read_header (shorter now) is a ValueError. BF16 comes back as float32 (exact)."""
    path = Path(path)
    out = {}
    try:
        with open(path, "rb") as f:
            for name in header.entries if names is None else names:
                e = header.entries[name]
                buf = np.empty(e.end - e.begin, np.uint8)
                f.seek(header.data_start + e.begin)
                if f.readinto(buf) != buf.size:
                    _fail(path, f"the file ended inside tensor {_short(name)} (truncated since its header was read)")
                a = buf.view(DTYPES[e.dtype]).reshape(e.shape)
                if e.dtype == "BF16":  # bfloat16 = the top 16 bits of a float32
                    a = (a.astype(np.uint32) << 16).view(np.float32)
                out[name] = a.astype(a.dtype.newbyteorder("="), copy=False)
    except OSError as err:
        raise ValueError(f"{str(path)!r} cannot be read: {err.strerror or err}") from None
    return out


def read_safetensors(path) -> dict:
    """{name: np.ndarray} of every tensor of a .safetensors file; a malformed file is a ValueError naming it."""
    return read_tensors(path, read_header(path))
