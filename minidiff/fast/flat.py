"""One flat buffer behind a dict of arrays, so that the optimizer, the EMA and gradient clipping
run a few whole-buffer ops per step instead of a few ops per tensor.

    buffer = [a_0.ravel(), 0 ... 0, a_1.ravel(), 0 ... 0, ...]     (the dict's key order)
    a_k    = buffer[o_k : o_k + n_k].reshape(shape_k)              (a view: writing a_k writes buffer)

Each o_k is a multiple of ALIGN entries (the gaps hold zeros), 256 bytes in float32, so every view
is as aligned as the buffer itself (CuPy's pool hands out 256-byte aligned blocks): BLAS and cuBLAS
pick their fast paths by alignment. Adam and the EMA are elementwise and map zeros to zeros, so applying them once to
the whole buffers gives the same numbers, bit for bit, as applying them tensor by tensor; the
global gradient norm is the same sum in another order. What this saves is per-call cost: the
`small` preset has 182 tensors, so one AdamW step is about 2500 array ops tensor by tensor (each
one kernel launch on a GPU, a few microseconds of Python on a CPU), and 14 on the buffers.
torch.optim does the same with its "foreach" and "fused" implementations.

A FlatDict is an ordinary dict of its views, so everything that reads or writes params[key] works
unchanged (checkpoints keep their per-key format). Assigning a new array to a key cuts that key
loose from the buffer: intact() then says False and the callers fall back to the per-key loop.

Shape legend: P the buffer's length (the entries plus the alignment gaps), n_k and shape_k the
size and shape of array k.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module

ALIGN = 64  # entries: 256 bytes in float32, 512 in float64


class FlatDict(dict):
    """{key: view of buffer} in layout order; .buffer is the 1-D array (P,), .layout ((key, shape), ...)."""

    def __init__(self, buffer, layout: tuple):
        views, offset = {}, 0
        for key, shape in layout:
            n = math.prod(shape)
            views[key] = buffer[offset:offset + n].reshape(shape)
            offset += -(-n // ALIGN) * ALIGN  # the next multiple of ALIGN
        if offset != buffer.shape[0]:
            raise ValueError(f"buffer must have {offset} entries for this layout, got {buffer.shape[0]}")
        super().__init__(views)
        self.buffer, self.layout = buffer, layout
        self._views = tuple(views.values())

    def intact(self) -> bool:
        """True while every key still holds its own view of the buffer."""
        return len(self) == len(self._views) and all(a is b for a, b in zip(self.values(), self._views))


def layout_of(arrays: dict) -> tuple:
    """((key, shape), ...) in the dict's order."""
    return tuple((key, tuple(a.shape)) for key, a in arrays.items())


def buffer_size(layout: tuple) -> int:
    """P = sum_k n_k rounded up to a multiple of ALIGN."""
    return sum(-(-math.prod(shape) // ALIGN) * ALIGN for _, shape in layout)


def flatten(arrays: dict) -> FlatDict:
    """A FlatDict holding a copy of arrays: same keys, order, shapes, values, dtype and backend."""
    if not arrays:
        raise ValueError("arrays must hold at least one array")
    dtypes = {a.dtype for a in arrays.values()}
    if len(dtypes) != 1:
        raise ValueError(f"arrays must share one dtype to share a buffer, got {sorted(map(str, dtypes))}")
    xp = get_array_module(*arrays.values())
    layout = layout_of(arrays)
    out = FlatDict(xp.zeros(buffer_size(layout), dtype=dtypes.pop()), layout)
    for key, a in arrays.items():
        out[key][...] = a
    return out


def zeros_like(arrays: dict) -> dict:
    """Zeros shaped like arrays: a FlatDict of the same layout when arrays is an intact FlatDict."""
    if isinstance(arrays, FlatDict) and arrays.intact():
        return FlatDict(get_array_module(arrays.buffer).zeros_like(arrays.buffer), arrays.layout)
    return {k: get_array_module(a).zeros_like(a) for k, a in arrays.items()}


def copy(arrays: dict) -> dict:
    """A copy of arrays: a FlatDict of the same layout when arrays is an intact FlatDict."""
    if isinstance(arrays, FlatDict) and arrays.intact():
        return FlatDict(arrays.buffer.copy(), arrays.layout)
    return {k: a.copy() for k, a in arrays.items()}


def buffers(*dicts):
    """The buffers of dicts, when every one is an intact FlatDict of one layout and one backend; else None."""
    first = dicts[0]
    if not all(isinstance(d, FlatDict) and d.layout == first.layout and d.intact() for d in dicts):
        return None
    xp = get_array_module(first.buffer)
    if any(get_array_module(d.buffer) is not xp for d in dicts):
        return None
    return tuple(d.buffer for d in dicts)


_GAPS: dict = {}  # (array module, dtype, n) -> a read-only row of n zeros, made once


def _gap(xp, n: int, dtype):
    key = (xp, str(dtype), n)
    if key not in _GAPS:
        _GAPS[key] = xp.zeros(n, dtype=dtype)
    return _GAPS[key]


# On NumPy the buffers are updated in pieces of this many entries, so that the dozen ops of one
# update rule meet in the CPU cache (as conv2d's batch chunks do); on CuPy in one piece, one launch per op.
PIECE = 2**16  # 256 KB of float32 (2**14 to 2**18 time alike here; 2**12 and the whole buffer are slower)


def pieces(bufs: tuple) -> list:
    """[bufs] on CuPy; on NumPy the list of (b[i:i + PIECE] for b in bufs) over the buffers' length."""
    xp = get_array_module(*bufs)
    n = bufs[0].shape[0]
    if xp is not np:
        return [bufs]
    return [tuple(b[i:i + PIECE] for b in bufs) for i in range(0, n, PIECE)]


def gather(arrays: dict, like: dict) -> dict:
    """arrays copied into one new buffer with like's layout (one concatenate), when like is an intact
    FlatDict; otherwise arrays itself. arrays must have like's keys and shapes."""
    if not (isinstance(like, FlatDict) and like.intact()):
        return arrays
    if set(arrays) != set(like) or any(tuple(arrays[k].shape) != shape for k, shape in like.layout):
        raise ValueError(f"arrays must have the keys and shapes of the flat dict they are gathered like "
                         f"({len(like)} keys); got {len(arrays)} arrays that differ")
    xp = get_array_module(*arrays.values())
    dtype = xp.result_type(*(a.dtype for a in arrays.values()))
    parts = []
    for key, shape in like.layout:
        n = math.prod(shape)
        parts.append(arrays[key].reshape(n))
        if n % ALIGN:
            parts.append(_gap(xp, ALIGN - n % ALIGN, dtype))  # the alignment gap stays zero
    return FlatDict(xp.concatenate(parts).astype(dtype, copy=False), like.layout)
