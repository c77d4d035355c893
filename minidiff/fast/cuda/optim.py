"""Adam/AdamW and the EMA of the weights on CuPy, each update one kernel over the flat buffers.

optim.py's Adam.step and EMA.update call these when the params are a flat.FlatDict on CuPy (the
Trainer makes them so) unless MINIDIFF_FUSED=0 (backend.FUSED). The bodies are optim.py's lines,
in the same order, with every scalar that the array code computes in float64 on the host (1 - beta1,
1 - beta2, 1 - lr wd, lr / (1 - beta1^t), ...) computed there too and passed in. They are compiled
with --fmad=false, so no multiply-add is contracted into one rounding: each operation rounds as the
array ops do, and the fused update gives the array ops' numbers bit for bit (tests/test_gpu_parity.py).

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
    """Adam.step's update of one group of flat buffers (P,), in place, in one kernel."""
    beta1, beta2 = betas
    keep = 1.0 - lr * weight_decay if decoupled else 1.0  # AdamW's decoupled decay
    wd = 0.0 if decoupled else weight_decay  # Adam's L2 penalty in the gradient (g + 0 p = g: the same numbers)
    _kernels(xp)["adam"](g, keep, wd, beta1, 1.0 - beta1, beta2, 1.0 - beta2, bias_correction2_sqrt, eps,
                         step_size, p, m, v)


def ema_update_cuda(xp, e, p, decay: float) -> None:
    """EMA.update of one pair of flat buffers (P,): e = e - (1 - decay) (e - p), in place, in one kernel."""
    _kernels(xp)["ema"](p, 1.0 - decay, e)
