"""GroupNorm on CuPy in fewer kernels: the formulas of fast/cpu/groupnorm.py (nn/groupnorm.py's, folded),
its statistics and its activation-sized passes each fused into one kernel. fast/norm.py's
groupnorm_forward / groupnorm_backward call these on CuPy; the cache is nn/groupnorm.py's.

    forward   mean_g = sum x / M, then rstd_g = 1 / sqrt(sum (x - mean_g)^2 / M + eps) (one kernel,
              a block per group), y = (x - mean_g) a_c + beta_c with a_c = rstd_g gamma_c (one kernel)
                                                                                     2 launches, not 10
    backward  s1_c = sum dy, s2_c = sum dy (x - mean_g) (one reduction), the small (N, C) / (N, G) sums
              (one reduction each), dx = dy a_c + ((x - mean_g) k1_g + k0_g) (one kernel)    8 launches, not 24

With silu=True (fast/norm.py's groupnorm_silu_*: y = silu(GroupNorm(x))) the same launches also apply SiLU:
the forward's last kernel writes silu(h), h = (x - mean_g) a_c + beta_c, and never h itself; the
backward recomputes h and dh = silu'(h) dy inside s1's and s2's reductions and its last kernel.

Each launch costs host time (tens of microseconds through CuPy), and a `small` step has 27 GroupNorms.
The statistics were a CuPy mean and a ReductionKernel; on an H100 those took 60 us of GPU and ~100 us
of host time per GroupNorm at batch 128, where the one raw kernel reads each group twice from a block
of its own. tests/test_gpu_parity.py checks every kernel against NumPy (and against the reference ops).

Shape legend: N batch, C channels, G groups, Cg = C / G, L = prod(spatial), M = Cg * L.
"""

from __future__ import annotations

import numpy as np

from .silu import SILU_CUDA

_KERNELS: dict = {}  # name -> cupy kernel, made on first use

# mean and rstd of each row of a contiguous (rows, M) array: one block of STATS_THREADS threads per row
# (= group), each summing a strided share of it, the shares then added in a tree; two passes over the
# row, as NumPy's var: the mean first, then the squared deviations from it. SCALAR: float or double.
STATS_THREADS = 256  # a power of 2 (the tree halves it)
_STATS = """
extern "C" __global__ void minidiff_gn_stats_SCALAR(const SCALAR* x, SCALAR* mean, SCALAR* rstd,
                                                    const long long m, const SCALAR eps) {
    __shared__ SCALAR part[THREADS];
    const SCALAR* row = x + (long long)blockIdx.x * m;
    const unsigned int t = threadIdx.x;
    SCALAR acc = 0;
    for (long long k = t; k < m; k += blockDim.x) acc += row[k];
    part[t] = acc;
    __syncthreads();
    for (unsigned int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    const SCALAR mu = part[0] / (SCALAR)m;  // mean_g = sum x / M
    __syncthreads();
    acc = 0;
    for (long long k = t; k < m; k += blockDim.x) {
        const SCALAR d = row[k] - mu;
        acc += d * d;
    }
    part[t] = acc;
    __syncthreads();
    for (unsigned int h = blockDim.x / 2; h > 0; h >>= 1) {
        if (t < h) part[t] += part[t + h];
        __syncthreads();
    }
    if (t == 0) {
        mean[blockIdx.x] = mu;
        rstd[blockIdx.x] = 1 / sqrt(part[0] / (SCALAR)m + eps);  // rstd_g = 1 / sqrt(var_g + eps)
    }
}
"""


def _kernels(xp) -> dict:
    """The CuPy kernels, made once: reductions (over the axis given at the call) and elementwise maps."""
    if not _KERNELS:
        red, ew = xp.ReductionKernel, xp.ElementwiseKernel
        for scalar in ("float", "double"):  # mean and rstd per group, for float32 / float64
            code = _STATS.replace("SCALAR", scalar).replace("THREADS", str(STATS_THREADS))
            _KERNELS["stats_" + scalar] = xp.RawKernel(code, "minidiff_gn_stats_" + scalar)
        _KERNELS["dot_centered"] = red(  # sum_k dy (x - m)
            "T dy, T x, T m", "T s", "dy * (x - m)", "a + b", "s = a", "0", "minidiff_gn_dot_centered")
        _KERNELS["dot"] = red(  # sum_k u v
            "T u, T v", "T s", "u * v", "a + b", "s = a", "0", "minidiff_gn_dot")
        _KERNELS["apply"] = ew(
            "T x, T mean, T rstd, T gamma, T beta", "T y", "y = (x - mean) * (rstd * gamma) + beta;", "minidiff_gn_apply")
        _KERNELS["k"] = ew(
            "T rstd, T a1, T a2, T m", "T k1, T k0", "k1 = -(rstd * rstd * rstd) * a2 / m; k0 = -rstd * a1 / m;",
            "minidiff_gn_k")
        _KERNELS["backward_apply"] = ew(
            "T dy, T x, T mean, T rstd, T gamma, T k1, T k0", "T dx",
            "dx = dy * (rstd * gamma) + ((x - mean) * k1 + k0);", "minidiff_gn_backward_apply")
        # silu=True: h = (x - m) (rstd gamma) + beta recomputed where needed
        _KERNELS["apply_silu"] = ew(
            "T x, T mean, T rstd, T gamma, T beta", "T y",
            "y = minidiff_silu((x - mean) * (rstd * gamma) + beta);", "minidiff_gn_apply_silu",
            preamble=SILU_CUDA)
        _KERNELS["silu_grad_sum"] = red(  # sum_k dh, dh = silu'(h) dy
            "T dy, T x, T m, T rstd, T gamma, T beta", "T s",
            "minidiff_silu_grad((x - m) * (rstd * gamma) + beta, dy)",
            "a + b", "s = a", "0", "minidiff_gn_silu_grad_sum", preamble=SILU_CUDA)
        _KERNELS["silu_grad_dot_centered"] = red(  # sum_k dh (x - m)
            "T dy, T x, T m, T rstd, T gamma, T beta", "T s",
            "minidiff_silu_grad((x - m) * (rstd * gamma) + beta, dy) * (x - m)",
            "a + b", "s = a", "0", "minidiff_gn_silu_grad_dot_centered", preamble=SILU_CUDA)
        _KERNELS["silu_backward_apply"] = ew(
            "T dy, T x, T mean, T rstd, T gamma, T beta, T k1, T k0", "T dx",
            "T dh = minidiff_silu_grad((x - mean) * (rstd * gamma) + beta, dy); "
            "dx = dh * (rstd * gamma) + ((x - mean) * k1 + k0);",
            "minidiff_gn_silu_backward_apply", preamble=SILU_CUDA)
    return _KERNELS


def groupnorm_forward_cuda(xp, x, gamma, beta, g: int, eps: float, silu: bool = False):
    """groupnorm_forward's y (silu(y) with silu=True) and (mean, rstd) (N, G), in 2 kernels; x (N, C, *S) on CuPy."""
    k = _kernels(xp)
    n, c = x.shape[:2]
    xg = xp.ascontiguousarray(x).reshape(n, g, -1)  # (N, G, M)
    m = xg.shape[2]
    mean = xp.empty((n, g), dtype=x.dtype)  # (N, G) sum x / M
    rstd = xp.empty((n, g), dtype=x.dtype)  # (N, G) 1 / sqrt(var + eps), var = sum (x - mean)^2 / M (biased)
    stats = k["stats_" + ("float" if x.dtype == np.float32 else "double")]
    stats((n * g,), (STATS_THREADS,), (xg, mean, rstd, np.int64(m), x.dtype.type(eps)))
    x4 = x.reshape(n, g, c // g, -1)  # (N, G, Cg, L)
    apply = k["apply_silu" if silu else "apply"]
    # y = (x - mean_g) a_c + beta_c with the folded scale a_c = rstd_g gamma_c, formed in the kernel
    y = apply(x4, mean[:, :, None, None], rstd[:, :, None, None], gamma.reshape(1, g, -1, 1), beta.reshape(1, g, -1, 1))
    return y.reshape(x.shape), mean, rstd


def groupnorm_backward_cuda(xp, dy, x, gamma, mean, rstd, g: int, beta=None):
    """groupnorm_backward's (dx, dgamma, dbeta), in 8 kernels; the expansion of fast/cpu/groupnorm.py.

    With beta given, dy is the gradient of silu(GroupNorm(x)) (groupnorm_forward_cuda's silu=True), and
    dh = silu'(h) dy takes dy's place in every formula, recomputed from h = (x - mean) a + beta."""
    k = _kernels(xp)
    n, c = x.shape[:2]
    x4, dy4 = x.reshape(n, g, c // g, -1), dy.reshape(n, g, c // g, -1)  # (N, G, Cg, L)
    shape4 = x4.shape
    m = shape4[2] * shape4[3]  # M
    mean4, rstd4 = mean[:, :, None, None], rstd[:, :, None, None]  # (N, G, 1, 1)
    gamma4 = gamma.reshape(1, g, -1, 1)  # (1, G, Cg, 1)
    if beta is None:
        s1 = dy4.sum(axis=3)  # (N, G, Cg) sum_S dy
        s2 = k["dot_centered"](dy4, x4, xp.broadcast_to(mean4, shape4), axis=3)  # (N, G, Cg) sum_S dy (x - mean)
    else:
        beta4 = beta.reshape(1, g, -1, 1)  # (1, G, Cg, 1)
        args = [dy4, x4] + [xp.broadcast_to(v, shape4) for v in (mean4, rstd4, gamma4, beta4)]
        s1 = k["silu_grad_sum"](*args, axis=3)  # (N, G, Cg) sum_S dh
        s2 = k["silu_grad_dot_centered"](*args, axis=3)  # (N, G, Cg) sum_S dh (x - mean)
    dbeta = s1.sum(axis=0).reshape(c)  # (C,)
    dgamma = k["dot"](s2, xp.broadcast_to(rstd[:, :, None], s2.shape), axis=0).reshape(c)  # (C,) sum_N rstd s2
    gamma_g = xp.broadcast_to(gamma.reshape(1, g, -1), s1.shape)  # (N, G, Cg)
    a1 = k["dot"](s1, gamma_g, axis=2)  # (N, G) sum_g dxhat
    a2 = k["dot"](s2, gamma_g, axis=2)  # (N, G) sum_g dxhat (x - mean)
    k1, k0 = k["k"](rstd, a1, a2, float(m))  # (N, G)
    k1, k0 = k1[:, :, None, None], k0[:, :, None, None]  # (N, G, 1, 1)
    if beta is None:
        dx = k["backward_apply"](dy4, x4, mean4, rstd4, gamma4, k1, k0)
    else:
        dx = k["silu_backward_apply"](dy4, x4, mean4, rstd4, gamma4, beta4, k1, k0)
    return dx.reshape(x.shape), dgamma, dbeta
