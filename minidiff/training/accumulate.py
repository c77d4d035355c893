"""Gradient accumulation: one optimizer step on the mean gradient of K micro-batches.

Shape legend: K micro-batches, B rows each, N = K B rows of the whole batch.

    L = (1/K) sum_k L_k,   grad L = (1/K) sum_k grad L_k       (L_k: the mean loss of rows kB..(k+1)B)

Each L_k is a mean over B rows, so the result is the loss and gradient of the whole batch of K B rows
(up to the order of the sums): the trainer draws the whole batch at once, from the same generator calls
a run with --batch-size K B makes, and only the model calls go piece by piece (memory of B rows).
"""

from __future__ import annotations


def rows(batch, start: int, stop: int):
    """Rows start:stop of every array with a batch axis (dicts entry by entry; None and 0-d whole), and of
    the dropout masks (model/dropout.py's DropoutMasks.take_rows: drawn later, for those rows only)."""
    if isinstance(batch, dict):
        return {k: rows(v, start, stop) for k, v in batch.items()}
    if hasattr(batch, "take_rows"):
        return batch.take_rows(start, stop)
    return batch[start:stop] if getattr(batch, "ndim", 0) > 0 else batch


def accumulate(map_batch, fn, batch: dict, k: int, rows_per_step: int, **shared):
    """(L, grads) = (1/K) sum_k map_batch(fn, rows of micro-batch k, **shared); K = 1 is map_batch itself.

    Micro-batch k's gradients are summed into micro-batch 0's arrays in place (each call returns new
    arrays, a flat buffer's views included), so the result keeps map_batch's layout."""
    if k == 1:
        return map_batch(fn, batch, **shared)
    b = rows_per_step // k
    loss, total, w = None, None, 1.0 / k
    for i in range(k):
        part_loss, grads = map_batch(fn, rows(batch, i * b, (i + 1) * b), **shared)
        if i == 0:
            loss, total = part_loss * w, grads
            for key in total:
                g = total[key]
                g *= w
        else:
            loss = loss + part_loss * w
            for key in total:
                g = total[key]
                g += grads[key] * w
    return loss, total
