"""The messages between the parent and its shard workers (shard_processes.py), without pickle:

    message = len(header) (8 bytes, little-endian) + header + the arrays' bytes, one after another
    header  = JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]}

Only plain numeric arrays travel (object dtypes are refused both ways), read back with np.frombuffer.

Shape legend: any shapes; 0-d arrays stay 0-d.
"""

from __future__ import annotations

import json

import numpy as np


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
