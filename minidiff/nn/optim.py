"""The update rules of Adam / AdamW and of the weights' EMA, stateless: the state (m, v, the step
count, the EMA's average) is passed in and updated in place. training/optim.py holds the state.

Adam (Kingma & Ba 2015, Alg. 1, with torch.optim.Adam's placement of eps), step t = 1, 2, ...:
    g   = grad + weight_decay * p                       (Adam: L2 penalty folded into the gradient)
    p   = p * (1 - lr * weight_decay)                   (AdamW: decoupled decay, Loshchilov & Hutter)
    m   = beta1 * m + (1 - beta1) * g                   exp_avg
    v   = beta2 * v + (1 - beta2) * g^2                 exp_avg_sq
    p   = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
EMA:  ema = ema - (1 - decay) (ema - p)
Global-norm clipping (torch.nn.utils.clip_grad_norm_):
      total_norm = sqrt(sum_k ||g_k||^2);  g_k *= min(1, max_norm / (total_norm + 1e-6))

Shape legend: every array has the shape of its parameter; params, grads, m, v and the EMA are
dicts keyed by the same state-dict names.
"""

from __future__ import annotations

import math

from ..backend import get_array_module


def adam_update(params, grads, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, decoupled, step):
    """p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps), m and v updated first (t = step)

    Inputs:  params, grads, exp_avg (m), exp_avg_sq (v): dicts of arrays with the same keys and shapes;
             lr, eps, weight_decay >= 0; betas (beta1, beta2) in [0, 1); decoupled: AdamW (True) or Adam's
             L2 term (False); step t >= 1, the number of this update.
    Updates params, exp_avg and exp_avg_sq in place; returns None.
    """
    beta1, beta2 = betas
    step_size = lr / (1.0 - beta1 ** step)  # lr / (1 - beta1^t)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)  # sqrt(1 - beta2^t)
    for key, p in params.items():
        g, m, v = grads[key], exp_avg[key], exp_avg_sq[key]
        if weight_decay != 0.0 and decoupled:
            p *= 1.0 - lr * weight_decay  # p = p (1 - lr wd)
        elif weight_decay != 0.0:
            g = g + weight_decay * p  # g = grad + wd p
        m *= beta1
        m += (1.0 - beta1) * g  # m = beta1 m + (1 - beta1) g
        v *= beta2
        v += (1.0 - beta2) * (g * g)  # v = beta2 v + (1 - beta2) g^2
        denom = get_array_module(v).sqrt(v) / bias_correction2_sqrt + eps  # sqrt(v_hat) + eps
        p -= step_size * (m / denom)  # p = p - lr m_hat / (sqrt(v_hat) + eps)


def ema_update(shadow, params, decay):
    """ema = ema - (1 - decay) (ema - p) for every parameter, in place (shadow and params: same keys)."""
    for key, e in shadow.items():
        e -= (1.0 - decay) * (e - params[key])  # ema = ema - (1 - decay) (ema - p)


def clip_grad_norm(grads, max_norm):
    """g_k *= min(1, max_norm / (total_norm + 1e-6)),  total_norm = sqrt(sum_k ||g_k||_2^2), in place

    Returns total_norm as a 0-d array on the grads' backend: nothing is read back to the host (no GPU
    synchronization), as torch does it, by multiplying with the clamped coefficient even when it is 1.
    A nan/inf total_norm makes the grads nan, for the caller to stop on (torch's error_if_nonfinite=False).
    Inputs: grads {name: array}; max_norm > 0.
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm > 0:
        raise ValueError(f"max_norm must be a number > 0, got {max_norm!r}")
    if not grads:
        return 0.0
    xp = get_array_module(*grads.values())
    total_norm = xp.sqrt(sum(xp.linalg.norm(g.ravel()) ** 2 for g in grads.values()))  # 0-d, on the device
    clip_coef = xp.minimum(max_norm / (total_norm + 1e-6), 1.0)  # nan stays nan
    for g in grads.values():
        g *= clip_coef.astype(g.dtype)
    return total_norm
