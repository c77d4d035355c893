"""SiLU on CuPy, one ElementwiseKernel each way: nn/activations.py's formulas in the same order, where
the NumPy code takes 5 array ops forward and 9 backward (each a kernel launch on a GPU).

    forward   y = x * s,                          s = 1 / (1 + exp(-x))
    backward  dx = ((1 - s) * x + 1) * s * dy     (s recomputed, as nn/activations.py does)

SILU_CUDA also serves GroupNorm's kernels (fast/cuda/groupnorm.py), which apply SiLU as they write.

Shape legend: ... any shape; the kernels are elementwise.
"""

from __future__ import annotations

_KERNELS = {}  # "forward" / "backward" -> cupy.ElementwiseKernel, made on first use

# SiLU and its gradient as CUDA device functions, for these kernels and GroupNorm's (fast/cuda/groupnorm.py):
# the formulas of nn/activations.py's silu_forward and silu_backward, in the same order
SILU_CUDA = """
template <typename T> __device__ T minidiff_silu(T x) {
    T s = 1 / (1 + exp(-x));
    return x * s;
}
template <typename T> __device__ T minidiff_silu_grad(T x, T dy) {
    T s = 1 / (1 + exp(-x));
    return ((1 - s) * x + 1) * s * dy;
}
"""


def _kernels(xp) -> dict:
    """The fused SiLU kernels for CuPy: y = x * s and dx = ((1 - s) * x + 1) * s * dy, s = 1 / (1 + exp(-x))."""
    if not _KERNELS:
        _KERNELS["forward"] = xp.ElementwiseKernel(
            "T x", "T y", "y = minidiff_silu(x);", "minidiff_silu_forward", preamble=SILU_CUDA)
        _KERNELS["backward"] = xp.ElementwiseKernel(
            "T x, T dy", "T dx", "dx = minidiff_silu_grad(x, dy);", "minidiff_silu_backward", preamble=SILU_CUDA)
    return _KERNELS


def silu_forward_cuda(xp, x):
    """silu_forward's y = x * sigma(x) in one kernel; x on CuPy."""
    return _kernels(xp)["forward"](x)


def silu_backward_cuda(xp, x, dy):
    """silu_backward's dx = dy * sigma(x) * (1 + x * (1 - sigma(x))) in one kernel; x, dy on CuPy."""
    return _kernels(xp)["backward"](x, dy)
