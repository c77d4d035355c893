"""What travels between the parent and its shard workers (shard_processes.py), without pickle:
the messages, and the shared files that hold the flat buffers of the weights and the gradients.

    message = len(header) (8 bytes, little-endian) + header + the arrays' bytes, one after another
    header  = JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]}

Only plain numeric arrays travel (object dtypes are refused both ways), read back with np.frombuffer.
A shared file is the raw bytes of one flat buffer (flat.py), mapped by both sides with np.memmap.

Shape legend: any shapes; 0-d arrays stay 0-d.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .. import flat


def pack(meta: dict, arrays: dict) -> bytes:
    """One message: len(header) (8 bytes, little-endian), header = JSON {meta, arrays: [[name, dtype, shape,
    offset], ...]}, then the arrays' bytes (C order) one after another."""
    table, chunks, offset = [], [], 0
    for name, a in arrays.items():
        a = np.asarray(a)  # (tobytes() writes C order whatever the layout; 0-d stays 0-d)
        if a.dtype.hasobject:
            raise ValueError(f"array {name!r} has dtype {a.dtype}: only plain numeric arrays travel")
        table.append([name, a.dtype.str, list(a.shape), offset])
        chunks.append(a.tobytes())
        offset += a.nbytes
    header = json.dumps({"meta": meta, "arrays": table}).encode()
    return len(header).to_bytes(8, "little") + header + b"".join(chunks)


def unpack(data: bytes) -> tuple[dict, dict]:
    """(meta, {name: array}) of a message made by pack; the arrays are read-only views of data."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    body = memoryview(data)[8 + n:]
    arrays = {}
    for name, dtype, shape, offset in header["arrays"]:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError(f"array {name!r} has dtype {dt}: refused")
        count = int(np.prod(shape, dtype=np.int64))
        arrays[name] = np.frombuffer(body, dtype=dt, count=count, offset=offset).reshape(shape)
    return header["meta"], arrays


def shared_file(nbytes: int) -> str:
    """A new file of nbytes zeros in shared memory: /dev/shm where it exists and has the room, else the temp
    folder. The room is taken up front (posix_fallocate), so that a full /dev/shm (a container's is often
    64 MB) falls back here instead of killing the process at its first write (SIGBUS)."""
    folders = (["/dev/shm"] if os.path.isdir("/dev/shm") else []) + [None]  # None: tempfile's default
    for i, folder in enumerate(folders):
        fd, path = tempfile.mkstemp(prefix="minidiff-shard-", suffix=".buf", dir=folder)
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, max(nbytes, 1))
            else:
                os.ftruncate(fd, max(nbytes, 1))
        except OSError:
            unlink(path)
            if i == len(folders) - 1:
                raise
            continue
        finally:
            os.close(fd)
        return path


def unlink(path: str) -> None:
    """Delete a shared file; a file already gone (or, on Windows, still mapped) is left as it is."""
    try:
        os.unlink(path)
    except OSError:  # gone already; or, on Windows, still mapped (then it goes at close)
        pass


def flat_view(path: str, dtype: str, layout, mode: str) -> flat.FlatDict:
    """The FlatDict whose buffer is the shared file at path (layout: [[key, shape], ...])."""
    layout = tuple((key, tuple(shape)) for key, shape in layout)
    return flat.FlatDict(np.memmap(path, dtype=np.dtype(dtype), mode=mode, shape=(flat.buffer_size(layout),)),
                         layout)
