"""Mean squared error, the DDPM training loss ||eps - eps_theta(x_t, t)||^2 averaged over all entries.

Shape legend: (...) any shape, shared by pred and target; M = number of entries.
"""

from __future__ import annotations

from ..backend import get_array_module
from ._check import check_float, check_same_backend, check_shape


def mse_forward(pred, target):
    """loss = 1/M sum_i (pred_i - target_i)^2   (F.mse_loss(pred, target), reduction="mean")

    Inputs:  pred (...), target (...) of the same shape and float dtype.
    Returns: loss, a 0-d array in pred's dtype, and the cache for mse_backward.
    """
    check_same_backend(pred=pred, target=target)
    xp = get_array_module(pred)
    check_float("pred", pred)
    check_float("target", target)
    check_shape("target", target, pred.shape, "pred's shape")
    if target.dtype != pred.dtype:
        raise ValueError(f"target must have the dtype of pred ({pred.dtype}), got {target.dtype}")
    if pred.size == 0:
        raise ValueError("pred must have at least one entry (the mean of nothing is undefined)")
    diff = xp.asarray(pred - target)  # (...); asarray: NumPy turns a 0-d result into a scalar
    loss = xp.asarray(xp.mean(diff * diff))  # 0-d array, not a NumPy scalar
    cache = (
        diff,  # (...) pred - target: the gradient is linear in it; pred and target are not needed
    )
    return loss, cache


def mse_backward(dloss, cache):
    """dpred = 2/M (pred - target) dloss,   dtarget = -dpred

    Inputs:  dloss, a scalar or 0-d array (1.0 when the loss is the objective); cache from mse_forward.
    Returns: dpred (...), dtarget (...), in pred's dtype.
    """
    diff, = cache
    xp = get_array_module(diff)
    if getattr(dloss, "ndim", 0) != 0:
        raise ValueError(f"dloss must be a scalar or a 0-d array, got shape {tuple(dloss.shape)}")
    dloss = xp.asarray(dloss, dtype=diff.dtype)  # 0-d, in diff's dtype: no silent upcast of float32
    # forward: loss = mean(diff * diff)
    dpred = xp.asarray(diff * (dloss * diff.dtype.type(2.0 / diff.size)))  # (...); asarray as in forward
    # forward: diff = pred - target
    dtarget = xp.asarray(-dpred)  # (...)
    return dpred, dtarget
