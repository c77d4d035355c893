"""Reading an .npz (np.savez: a zip of .npy members) with NumPy, every declared size checked before an array is read.

    entry NAME.npy     the magic string, a header {"descr": dtype, "fortran_order": bool, "shape": (d0, ...)},
                       then the data: prod(shape) * itemsize bytes, stored verbatim or deflated

npy_headers checks that the entries declare no more bytes than the file holds and that each header declares no
more data than its entry can hold (a stored entry holds it verbatim, a deflated one at most DEFLATE_MAX_RATIO
times its compressed size), so a 1 KiB file cannot make us allocate 1 TiB; read_member then reads one member
with allow_pickle=False (an object array, a pickle, is a ValueError). pretrained.py reads its .npz files here.

Shape legend: none; each array keeps the shape its header declares.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

DEFLATE_MAX_RATIO = 1032  # deflate expands at most ~1032-fold: an .npz member's size is bounded by its bytes


def npy_headers(zf: zipfile.ZipFile, path) -> dict:
    """{name: (entry, shape, dtype)} of the .npy members of zf (the open zip of path), their sizes checked."""
    infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
    if sum(i.compress_size for i in zf.infolist()) > os.path.getsize(path):
        raise ValueError("its entries declare more bytes than the file holds")
    return {name: (info, *npy_header(zf, info)) for name, info in infos.items()}


def npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple:
    """(shape, dtype) declared by an .npz member's .npy header, after checking its data fits the member."""
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)  # headers are at most 10,000 bytes (NumPy's max_header_size)
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    stored = info.compress_type == zipfile.ZIP_STORED
    if nbytes > info.file_size or info.file_size > (1 if stored else DEFLATE_MAX_RATIO) * info.compress_size:
        raise ValueError(f"member {info.filename[:80]!r} declares {shape} {dtype} = {nbytes:,} bytes in an entry of "
                         f"{info.compress_size:,} bytes")
    return shape, dtype


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """The array of one member (checked by npy_header first), never unpickled."""
    with zf.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)  # an object array (a pickle) is a ValueError
