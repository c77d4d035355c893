"""What travels between the parent and its shard workers (shard_processes.py), without pickle:
the messages, and the shared files that hold the flat buffers of the weights and the gradients.

    message = len(header) (8 bytes, little-endian) + header + the arrays' bytes, one after another
    header  = JSON {"meta": {...}, "arrays": [[name, dtype, shape, offset], ...]}

Only plain numeric arrays travel (object dtypes are refused both ways), read back with np.frombuffer.
A function, a dataclass or an ops table travels as the "module:name" the worker imports it by
(encode / decode): the worker runs the code installed beside it, never code sent to it.
A shared file is the raw bytes of one flat buffer (flat.py), mapped by both sides with np.memmap.

Shape legend: any shapes; 0-d arrays stay 0-d.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile

import numpy as np

from .. import flat
from ...nn.ops import Ops

# An ops table travels by its name; the worker imports the table of that name (a worker runs its shard
# in one piece: these tables' map_batch is the whole batch's).
OPS_TABLES = {"reference": "minidiff.nn.ops:REFERENCE", "fast": "minidiff.fast.ops:FAST"}


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


def qualified_name(obj) -> str:
    """'module:name' of a module-level function or class; ValueError for a closure, lambda or method."""
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", "")
    if module is None or "<" in name or getattr(importlib.import_module(module), name, None) is not obj:
        raise ValueError(f"{obj!r} is not a module-level function or class: only those can run in shard worker "
                         "processes (they import it by name); use shards='threads'")
    return f"{module}:{name}"


def by_name(qualified: str):
    """The object named 'module:name' (qualified_name's inverse)."""
    module, name = qualified.split(":")
    return getattr(importlib.import_module(module), name)


def encode(value, arrays: dict, name: str):
    """value as JSON, its arrays moved into arrays[name/...]: None, bools, numbers and strings as they are;
    arrays (0-d too) by name; dicts (string keys), lists and tuples entry by entry; an ops table by its name;
    a dataclass by its class's 'module:name' and its fields. Anything else is a TypeError."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.ndarray, np.generic)):
        arrays[name] = np.asarray(value)
        return {"array": name}
    if isinstance(value, dict):
        return {"dict": {str(k): encode(v, arrays, f"{name}/{k}") for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [encode(v, arrays, f"{name}/{i}") for i, v in enumerate(value)]}
    if isinstance(value, Ops):
        if value.name not in OPS_TABLES:
            raise TypeError(f"ops table {value.name!r} cannot run in shard worker processes (known: "
                            f"{sorted(OPS_TABLES)}); use shards='threads'")
        return {"ops": value.name}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": qualified_name(type(value)),
                "fields": {f.name: encode(getattr(value, f.name), arrays, f"{name}/{f.name}")
                           for f in dataclasses.fields(value)}}
    raise TypeError(f"{name}: a {type(value).__name__} cannot travel to a shard worker process; use shards='threads'")


def decode(value, arrays: dict):
    """encode's inverse, in the worker: the same values, the arrays read-only views of the message."""
    if not isinstance(value, dict):
        return value
    if "dataclass" in value:
        return by_name(value["dataclass"])(**{k: decode(v, arrays) for k, v in value["fields"].items()})
    (kind, body), = value.items()
    if kind == "array":
        return arrays[body]
    if kind == "dict":
        return {k: decode(v, arrays) for k, v in body.items()}
    if kind in ("list", "tuple"):
        items = [decode(v, arrays) for v in body]
        return items if kind == "list" else tuple(items)
    return by_name(OPS_TABLES[body])  # "ops"
