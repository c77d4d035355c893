"""Tiny hostile files for the bad-input suite (tests/test_bad_inputs.py): each a few bytes to a few KB.

PNG headers that declare 50000 x 50000 pixels, a zTXt bomb, IDX files that declare a tebibyte, gzip bombs
of concatenated members, CIFAR batches with nested shared label lists or a pickled os.system call, .npz
members with a huge declared shape or a pickled object array, safetensors headers of 2**63 bytes, and
checkpoints rewritten with a field or an array changed.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

PWNED = "PWNED"  # the file a pickle payload would create if anything unpickled it (the tree hash sees it)


class Payload:
    """Unpickling this runs os.system('touch PWNED') in the current folder; minidiff must never do it."""

    def __reduce__(self):
        return os.system, (f"touch {PWNED}",)


# ----------------------------------------------------------------------------- images


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header(path: Path, width: int, height: int, depth: int = 8, color: int = 2) -> Path:
    """A PNG whose IHDR declares width x height (a few dozen bytes of IDAT: decoding would need the rest)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + _chunk(b"IEND", b""))
    return path


def png(path: Path, size: int = 8, mode: str = "RGB", value: int = 0) -> Path:
    """A real size x size image (PNG or JPEG by the suffix)."""
    from PIL import Image

    a = (np.arange(size * size * 3).reshape(size, size, 3) * 7 + value) % 256
    im = Image.fromarray(a.astype(np.uint8), "RGB")
    (im if mode == "RGB" else im.convert(mode)).save(path)
    return path


def png_ztxt_bomb(path: Path) -> Path:
    """An 8x8 PNG with a zTXt chunk that inflates to 64 MiB (about 64 KB on disk)."""
    raw = png(path.with_suffix(".tmp.png")).read_bytes()
    path.with_suffix(".tmp.png").unlink()
    bomb = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (64 << 20), 9))
    path.write_bytes(raw[:33] + bomb + raw[33:])  # after the signature (8) and IHDR (25)
    return path


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut path to its first fraction `keep` of bytes."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    return path


# ----------------------------------------------------------------------------- IDX, gzip


def idx(dims, body: bytes = b"", kind: int = 0x08) -> bytes:
    """IDX bytes: magic 00 00 kind ndim, big-endian int32 dims, the body."""
    return b"\x00\x00" + bytes([kind, len(dims)]) + np.array(dims, ">i4").tobytes() + body


def gzip_bomb(head: bytes, zeros_mib: int = 16) -> bytes:
    """head gzipped, then members of zeros: a few KB per 16 MiB inflated."""
    member = gzip.compress(b"\0" * (1 << 20), 9)
    return gzip.compress(head) + member * zeros_mib


# ----------------------------------------------------------------------------- CIFAR


def cifar_batch(data=None, labels=None, protocol: int = 2) -> bytes:
    """A pickled CIFAR-10 batch dict (written, never read back by unpickling)."""
    data = np.zeros((2, 3072), np.uint8) if data is None else data
    return pickle.dumps({b"data": data, b"labels": [0, 1] if labels is None else labels}, protocol=protocol)


# ----------------------------------------------------------------------------- .npz


def npz_declaring(path: Path, name: str, shape, descr: str = "|u1", extra: dict | None = None) -> Path:
    """An .npz whose member `name` declares shape (16 bytes of body follow); extra members are real arrays."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    with zipfile.ZipFile(path, "w") as zf:
        for key, arr in (extra or {}).items():
            buf = io.BytesIO()
            np.save(buf, arr)
            zf.writestr(f"{key}.npy", buf.getvalue())
        zf.writestr(f"{name}.npy", head.getvalue() + b"\0" * 16)
    return path


def object_array() -> np.ndarray:
    """A 1-element object array holding a Payload (np.save pickles it)."""
    a = np.empty(1, object)
    a[0] = Payload()
    return a


def images(n: int = 4, size: int = 8, channels: int = 3) -> np.ndarray:
    return (np.arange(n * size * size * channels).reshape(n, size, size, channels) % 256).astype(np.uint8)


# ----------------------------------------------------------------------------- checkpoints


def read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def rewrite_checkpoint(path: Path, meta=None, arrays=None) -> Path:
    """Rewrite a checkpoint .npz in place: meta(meta_dict) and arrays(flat_dict) edit them (return None to
    keep the edited object, or a replacement)."""
    flat = read_npz(path)
    m = json.loads(str(flat.pop("__meta__")[()]))
    if meta is not None:
        m = meta(m) or m
    if arrays is not None:
        flat = arrays(flat) or flat
    flat["__meta__"] = np.array(json.dumps(m))
    tmp = path.with_name("rewrite.npz")
    np.savez(tmp, **flat)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- safetensors


def safetensors_bytes(header, body: bytes = b"", length: int | None = None) -> bytes:
    """8-byte little-endian header length, the header (a dict as JSON, or raw bytes), the body."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body
