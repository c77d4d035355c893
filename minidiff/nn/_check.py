"""Input validation shared by the nn ops: clear ValueErrors that name the argument.

Index checks run on the host, because CuPy does not raise on an out-of-range index.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy


def check_float(name: str, x) -> None:
    """Raise ValueError unless x is a floating-point array."""
    dt = getattr(x, "dtype", None)
    if getattr(dt, "kind", None) != "f":  # NumPy's (and CuPy's) float16/32/64
        raise ValueError(f"{name} must be a floating-point array (float32 or float64), got {dt}")


def check_ndim(name: str, x, ndim: int, legend: str) -> None:
    """Raise ValueError unless x has ndim dimensions; legend names them, e.g. '(N, C, H, W)'."""
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {legend} ({ndim} dims), got shape {tuple(x.shape)}")


def check_shape(name: str, x, shape: tuple, legend: str) -> None:
    """Raise ValueError unless x.shape == shape."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {legend} = {tuple(shape)}, got {tuple(x.shape)}")


def check_same_backend(**arrays) -> None:
    """Raise ValueError when NumPy and CuPy arrays are mixed in one call."""
    kinds = {k: get_array_module(v).__name__ for k, v in arrays.items() if v is not None}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"arrays must all be NumPy or all CuPy, got {kinds}")


def check_indices(name: str, ids, n: int) -> None:
    """Raise ValueError unless ids is an integer array with 0 <= ids < n (checked on the host)."""
    dt = getattr(ids, "dtype", None)
    if dt is None or not np.issubdtype(np.dtype(dt), np.integer):
        raise ValueError(f"{name} must be an integer array, got {dt}")
    host = to_numpy(ids)
    if host.size and (host.min() < 0 or host.max() >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got values in [{host.min()}, {host.max()}]")
