"""Array backend: NumPy on the CPU, CuPy on one NVIDIA GPU.

This is the only module in minidiff that imports CuPy. Every op picks its array module
from its inputs (`xp = get_array_module(x)`), so the same code runs on both backends.
There is no global dtype: callers pass float32 (the default everywhere) or float64.

Shape legend: none; this module moves whole arrays.
"""

from __future__ import annotations

import numpy as np

_CUPY = None  # the imported cupy module, once import_cupy() succeeded
_CUPY_ERROR = None  # why it failed, to repeat in the error message

GPU_HINT = (
    "install CuPy for your CUDA version (pip install 'minidiff[gpu]', or cupy-cuda12x / "
    "cupy-cuda13x) on a machine with an NVIDIA GPU, or use --device cpu"
)


class BackendError(RuntimeError):
    """Raised when a GPU is asked for and CuPy or the GPU is missing."""


def import_cupy():
    """Return the cupy module, or raise BackendError with a one-line hint on how to fix it."""
    global _CUPY, _CUPY_ERROR
    if _CUPY is not None:
        return _CUPY
    try:
        import cupy  # noqa: PLC0415  (the one CuPy import of the package)

        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendError("CuPy found no CUDA device")
    except Exception as err:  # ImportError, CUDARuntimeError, BackendError
        _CUPY_ERROR = err
        raise BackendError(f"device 'gpu' is not available ({err}); {GPU_HINT}") from None
    _CUPY = cupy
    return cupy


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import_cupy()
    except BackendError:
        return False
    return True


def is_cupy_array(x) -> bool:
    """True for a cupy.ndarray, checked without importing CuPy."""
    return type(x).__module__.split(".")[0] == "cupy"


def get_array_module(*arrays):
    """Return cupy if any argument is a CuPy array, else numpy (None and scalars are ignored)."""
    for a in arrays:
        if type(a) is not np.ndarray and is_cupy_array(a):  # (the first test: this runs ~1000 times a forward)
            return import_cupy()
    return np


def to_numpy(x):
    """Copy a CuPy array to the host; NumPy arrays and scalars come back as np.ndarray."""
    if is_cupy_array(x):
        return x.get()
    return np.asarray(x)


def check_device(device: str) -> str:
    """Validate a device name: 'cpu' or 'gpu'."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if device == "gpu":
        import_cupy()
    return device


def xp_for(device: str):
    """The array module for a device name: numpy for 'cpu', cupy for 'gpu'."""
    return import_cupy() if check_device(device) == "gpu" else np


def to_device(x, device: str):
    """Move an array (or a dict of arrays, recursively) to 'cpu' (NumPy) or 'gpu' (CuPy)."""
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if check_device(device) == "cpu":
        return to_numpy(x)
    return import_cupy().asarray(x)


def device_of(x) -> str:
    """'gpu' for a CuPy array, 'cpu' otherwise."""
    return "gpu" if is_cupy_array(x) else "cpu"


def check_tf32(tf32: bool, device: str, dtype) -> bool:
    """Validate --tf32: it needs --device gpu and float32 (it changes float32 matmuls only)."""
    if tf32 and (device != "gpu" or np.dtype(dtype) != np.float32):
        raise ValueError(f"--tf32 needs --device gpu and --dtype float32 (TF32 is a mode of the GPU's float32 "
                         f"matmuls), got --device {device} --dtype {np.dtype(dtype)}")
    return bool(tf32)


def set_tf32(enabled: bool) -> None:
    """float32 matmuls on the GPU's tensor cores in TF32 (products of 10-bit mantissas, float32 sums:
    several times faster, relative error ~1e-3 instead of ~1e-7), or back to CuPy's default
    (exact float32 unless the environment sets CUPY_TF32=1). Every conv and linear of minidiff is a
    matmul on the GPU, so this covers them all. Only where the user asks: --tf32."""
    import_cupy()
    from cupy._core import _routines_linalg as linalg  # noqa: PLC0415  (CuPy's per-dtype cuBLAS compute type)

    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32 if enabled else linalg.COMPUTE_TYPE_DEFAULT)


def synchronize(x=None) -> None:
    """Wait for queued GPU work (a no-op on NumPy). Used by timers, never in hot loops."""
    if _CUPY is not None and (x is None or is_cupy_array(x)):
        _CUPY.cuda.get_current_stream().synchronize()
