"""Adam/AdamW and the EMA of the weights on CuPy, each update one kernel over the flat buffers.

fast/optim.py's adam_update and ema_update call these on CuPy: once over the flat buffers when every
dict is a flat.FlatDict (FAST's arrange_params makes them so), else once per tensor. The bodies are
nn/optim.py's lines, in the same order, with every scalar that the array code computes in float64 on
the host (1 - beta1, 1 - beta2, 1 - lr wd, lr / (1 - beta1^t), ...) computed there too and passed in.
They are compiled with --fmad=false, so no multiply-add is contracted into one rounding: each operation
rounds as the array ops do, and the fused update gives the array ops' numbers bit for bit
(tests/test_gpu_parity.py, tests/fast/test_optim.py on the fake CuPy).

    Adam   13 array ops over four buffers (14 with AdamW's decay, 15 with Adam's L2 term), 1 launch here
    EMA    3 array ops, 1 launch here

Shape legend: P, the length of the flat buffers (every parameter, with zero gaps for alignment).
"""

from __future__ import annotations

_KERNELS: dict = {}  # name -> cupy.ElementwiseKernel, made on first use
_OPTIONS = ("--fmad=false",)  # round each operation on its own, as the array ops do


def _kernels(xp) -> dict:
    if not _KERNELS:
        _KERNELS["adam"] = xp.ElementwiseKernel(
            "T g, T keep, T wd, T beta1, T c1, T beta2, T c2, T bc2_sqrt, T eps, T step_size", "T p, T m, T v",
            """
            T gw = g + wd * p;                                      // g + wd p (Adam's L2 term; wd = 0 otherwise)
            p = p * keep;                                           // p (1 - lr wd) (AdamW; keep = 1 otherwise)
            m = m * beta1 + c1 * gw;                                // m = beta1 m + (1 - beta1) g
            v = v * beta2 + c2 * (gw * gw);                         // v = beta2 v + (1 - beta2) g^2
            p = p - step_size * (m / (sqrt(v) / bc2_sqrt + eps));  // p - lr m_hat / (sqrt(v_hat) + eps)
            """, "minidiff_adam_update", options=_OPTIONS)
        _KERNELS["ema"] = xp.ElementwiseKernel(
            "T p, T c", "T e", "e = e - c * (e - p);", "minidiff_ema_update", options=_OPTIONS)
    return _KERNELS


def adam_update_cuda(xp, p, g, m, v, *, lr: float, betas, eps: float, weight_decay: float, decoupled: bool,
                     bias_correction2_sqrt: float, step_size: float) -> None:
    """nn.optim.adam_update of one group of flat buffers (P,) or of one tensor, in place, in one kernel."""
    beta1, beta2 = betas
    keep = 1.0 - lr * weight_decay if decoupled else 1.0  # AdamW's decoupled decay
    wd = 0.0 if decoupled else weight_decay  # Adam's L2 penalty in the gradient (g + 0 p = g: the same numbers)
    _kernels(xp)["adam"](g, keep, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, bias_correction2_sqrt, eps,
                         step_size, p, m, v)


def ema_update_cuda(xp, e, p, decay: float) -> None:
    """nn.optim.ema_update of one pair of flat buffers (P,) or tensors: e = e - (1 - decay) (e - p), in place,
    in one kernel."""
    _kernels(xp)["ema"](p, 1.0 - decay, e)
