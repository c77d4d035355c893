"""Adam/AdamW and the EMA with nn/optim.py's signatures, run over whole flat buffers (fast/flat.py).

When every dict is an intact flat.FlatDict of one layout (FAST's arrange_params = flat.flatten makes
the Trainer's parameters one, and the optimizer's state is arranged the same way), each rule runs
once over the buffers instead of once per tensor: a dozen array ops instead of a dozen per tensor.
The rules are elementwise and map the buffers' zero gaps to zeros, so the numbers are the per-tensor
ones bit for bit (tests/fast/test_optim.py):

    NumPy  nn/optim.py's rule itself, applied to the buffers in flat.PIECE-sized pieces (cache-sized)
    CuPy   one kernel per update (fast/cuda/optim.py: the same lines, each operation rounded as the
           array ops round it); on dicts that are not flat, one kernel per tensor

Adam with eps = 0 stays per tensor: a gap's update would be 0 / (0 + 0). Gradients that are not flat
while the rest is are gathered into one buffer first (one concatenate).

Shape legend: P, the length of the flat buffers; otherwise every array has its parameter's shape.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from ..nn import optim as reference
from . import flat
from .cuda.optim import adam_update_cuda, ema_update_cuda


def _groups(dicts: tuple) -> list:
    """[(a_1, b_1, ...), ...]: the flat buffers' pieces when every dict is flat alike, else tensor by tensor."""
    whole = flat.buffers(*dicts)
    if whole:
        return flat.pieces(whole)
    return [tuple(d[key] for d in dicts) for key in dicts[0]]


def adam_update(params, grads, exp_avg, exp_avg_sq, *, lr, betas, eps, weight_decay, decoupled, step):
    """nn.optim.adam_update over whole flat buffers (one kernel on CuPy); the same arguments and numbers."""
    if eps > 0 and not isinstance(grads, flat.FlatDict) and flat.buffers(params, exp_avg, exp_avg_sq):
        grads = flat.gather(grads, like=params)  # one buffer of the gradients, like the params'
    dicts = (params, grads, exp_avg, exp_avg_sq)
    groups = _groups(dicts) if eps > 0 else [tuple(d[key] for d in dicts) for key in params]
    if not groups:
        return
    if get_array_module(groups[0][0]) is np:  # the reference rule, once per piece of the buffers
        p, g, m, v = ({i: group[j] for i, group in enumerate(groups)} for j in range(4))
        reference.adam_update(p, g, m, v, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              decoupled=decoupled, step=step)
        return
    beta1, beta2 = betas
    for p, g, m, v in groups:  # the reference rule's lines in one kernel, with its host scalars
        adam_update_cuda(get_array_module(p), p, g, m, v, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled=decoupled, bias_correction2_sqrt=math.sqrt(1.0 - beta2 ** step),
                         step_size=lr / (1.0 - beta1 ** step))


def ema_update(shadow, params, decay):
    """nn.optim.ema_update over whole flat buffers (one kernel on CuPy); the same arguments and numbers."""
    groups = _groups((shadow, params))
    if not groups:
        return
    if get_array_module(groups[0][0]) is np:
        e, p = ({i: group[j] for i, group in enumerate(groups)} for j in range(2))
        reference.ema_update(e, p, decay)
        return
    for e, p in groups:
        ema_update_cuda(get_array_module(e), e, p, decay)  # ema = ema - (1 - decay) (ema - p), one kernel


def clip_grad_norm(grads, max_norm):
    """nn.optim.clip_grad_norm over the flat buffer's pieces when grads is one (its gaps are zeros: the same
    norm up to summation order, tests/fast/test_optim.py); otherwise the reference, tensor by tensor."""
    whole = flat.buffers(grads)
    if not whole:
        return reference.clip_grad_norm(grads, max_norm)
    return reference.clip_grad_norm({i: g for i, (g,) in enumerate(flat.pieces(whole))}, max_norm)
