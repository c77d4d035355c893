"""Softmax cross-entropy, the classifier's training loss, and log-softmax, its log-probabilities.

    log p_{n,k} = z_{n,k} - max_j z_{n,j} - log sum_j exp(z_{n,j} - max_j z_{n,j})     (log_softmax)
    loss = -1/N sum_n log p_{n, y_n}                                (F.cross_entropy, reduction="mean")
    dloss/dz_{n,k} = (p_{n,k} - [k == y_n]) / N

Shape legend: N batch, K classes. Labels are validated on the host (CuPy does not raise on an
out-of-range index).
"""

from __future__ import annotations

from ..backend import get_array_module
from ._check import check_float, check_indices, check_ndim, check_same_backend, check_shape


def log_softmax(logits, axis: int = -1):
    """log p = z - m - log sum exp(z - m),  m = max z along axis   (F.log_softmax; the shift by m keeps
    exp from overflowing, and log p stays exact even where p underflows to 0)

    Inputs:  logits (..., K, ...) float32 or float64.  Returns: log p, same shape and dtype.
    """
    check_float("logits", logits)
    xp = get_array_module(logits)
    shifted = logits - logits.max(axis=axis, keepdims=True)  # (..., K, ...), every entry <= 0
    return shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))


def softmax_cross_entropy_forward(logits, labels, check_labels: bool = True):
    """loss = -1/N sum_n log_softmax(z)_{n, y_n}   (F.cross_entropy(logits, labels), reduction="mean")

    Inputs:  logits z (N, K) float32 or float64, N >= 1; labels y (N,) integers in [0, K);
             check_labels=False skips the range check of labels, which reads device labels back to
             the host (a GPU sync): for labels the caller checked on the host before copying them.
    Returns: loss, a 0-d array in logits' dtype, and the cache for softmax_cross_entropy_backward.
    """
    check_same_backend(logits=logits, labels=labels)
    check_float("logits", logits)
    check_ndim("logits", logits, 2, "(N, K)")
    n, k = logits.shape
    if n < 1 or k < 1:
        raise ValueError(f"logits must have shape (N, K) with N >= 1 and K >= 1, got {tuple(logits.shape)}")
    if check_labels:
        check_indices("labels", labels, k)  # on the host
    check_shape("labels", labels, (n,), "(N,)")
    xp = get_array_module(logits)
    logp = log_softmax(logits, axis=1)  # (N, K)
    rows = xp.arange(n)
    loss = xp.asarray(-logp[rows, labels].mean())  # 0-d array, not a NumPy scalar
    cache = (
        xp.exp(logp),  # (N, K) softmax probabilities p: the gradient is p - onehot(y); logits not needed
        labels,  # (N,) the targets, a reference
    )
    return loss, cache


def softmax_cross_entropy_backward(dloss, cache):
    """dz = dloss * (p - onehot(y)) / N

    Inputs:  dloss, a scalar or 0-d array (1.0 when the loss is the objective; -N turns the mean loss
             into sum_n log p_{n, y_n}); cache from softmax_cross_entropy_forward.
    Returns: dlogits (N, K) in the logits' dtype (a fresh array: the cache is not modified).
    """
    p, labels = cache
    xp = get_array_module(p)
    if getattr(dloss, "ndim", 0) != 0:
        raise ValueError(f"dloss must be a scalar or a 0-d array, got shape {tuple(dloss.shape)}")
    n = p.shape[0]
    scale = xp.asarray(dloss, dtype=p.dtype) / p.dtype.type(n)  # 0-d, no upcast of float32
    # forward: loss = -mean_n log p[n, y_n],  log p = log_softmax(z)
    dlogits = p * scale  # (N, K) the softmax part, dloss p / N
    dlogits[xp.arange(n), labels] -= scale  # the -onehot(y) part
    return dlogits

