"""Scaled dot-product attention and multi-head attention, forward and backward by hand.

    a = softmax(q k^T / sqrt(D) + log m) v        (Vaswani et al. 2017, eq. 1; m the key mask)

Shape legend:
    N batch, L query tokens, S key tokens, C width of x, Cc width of the context,
    C_out width of the output, h heads, D head dim, Dv value head dim, inner = h * D.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module, to_numpy
from ._check import check_float, check_ndim, check_same_backend, check_shape
from .linear import linear_backward, linear_forward


def _check_mask(mask, n: int, s: int) -> None:
    """mask (N, S) bool, True = key kept; every row keeps at least one key (checked on the host)."""
    if getattr(mask, "dtype", None) is None or np.dtype(mask.dtype) != np.bool_:
        raise ValueError(f"mask must be a boolean array of shape (N, S), True = attend, "
                         f"got dtype {getattr(mask, 'dtype', type(mask).__name__)}")
    check_shape("mask", mask, (n, s), "(N, S)")
    kept = to_numpy(mask).any(axis=1)  # (N,)
    if not kept.all():
        rows = np.flatnonzero(~kept).tolist()
        raise ValueError(f"mask must keep at least one key in every row; rows {rows} mask every key "
                         f"(their softmax would be 0/0 = NaN)")


def sdpa_forward(q, k, v, mask=None, check_mask=True):
    """o = softmax(s) v,  s = q k^T / sqrt(D), s[n, :, :, j] = -inf where mask[n, j] is False.

    Softmax is computed stably: p = exp(s - max_j s) / sum_j exp(s - max_j s). A masked key
    gets p = exp(-inf) = 0 exactly, so it receives no attention and no gradient.

    q    (N, h, L, D)   queries
    k    (N, h, S, D)   keys
    v    (N, h, S, Dv)  values
    mask (N, S) bool or None; True = attend to that key. A row masking every key raises
         (checked on the host: a GPU synchronization; check_mask=False skips it for callers
         whose masks keep a key in every row by construction).
    returns o (N, h, L, Dv), cache
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(name, a)
        check_ndim(name, a, 4, "(N, h, L, D)" if name == "q" else "(N, h, S, D)")
    check_same_backend(q=q, k=k, v=v, mask=mask)
    n, h, _, d = q.shape
    s = k.shape[2]
    check_shape("k", k, (n, h, s, d), "(N, h, S, D)")
    check_shape("v", v, (n, h, s, v.shape[3]), "(N, h, S, Dv)")
    if s < 1:
        raise ValueError("k must hold at least one key (S >= 1), got S = 0")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if mask is not None and check_mask:
        _check_mask(mask, n, s)
    xp = get_array_module(q, k, v)
    scale = 1.0 / math.sqrt(d)

    scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale  # (N, h, L, S)
    if mask is not None:
        neg_inf = scores.dtype.type(-np.inf)  # a scalar: on CuPy a kernel argument, not a device copy
        scores = xp.where(mask[:, None, None, :], scores, neg_inf)  # (N, h, L, S)
    scores = scores - scores.max(axis=-1, keepdims=True)  # max is finite: every row keeps a key
    e = xp.exp(scores)  # (N, h, L, S)
    p = e / e.sum(axis=-1, keepdims=True)  # (N, h, L, S) attention probabilities
    o = xp.matmul(p, v)  # (N, h, L, Dv)

    cache = (
        q,  # (N, h, L, D): dk = ds^T q needs the queries
        k,  # (N, h, S, D): dq = ds k needs the keys
        v,  # (N, h, S, Dv): dp = do v^T needs the values
        p,  # (N, h, L, S): kept rather than recomputed (costs N h L S memory, saves two matmuls
        #     and the exp); it is dv = p^T do, the softmax Jacobian, and it carries the mask (p = 0)
        scale,  # float 1/sqrt(D)
    )
    return o, cache


def sdpa_backward(do, cache):
    """Gradients of o = softmax(q k^T / sqrt(D)) v.

    dv = p^T do;  dp = do v^T;  ds = p * (dp - sum_j p dp)  (softmax Jacobian);
    dq = ds k / sqrt(D);  dk = ds^T q / sqrt(D).   Masked keys have p = 0, hence ds = 0, dk = dv = 0.

    do (N, h, L, Dv), cache from sdpa_forward
    returns dq (N, h, L, D), dk (N, h, S, D), dv (N, h, S, Dv)
    """
    q, k, v, p, scale = cache
    check_float("do", do)
    check_shape("do", do, p.shape[:3] + (v.shape[3],), "(N, h, L, Dv)")
    xp = get_array_module(do, q)

    # forward: o = xp.matmul(p, v)
    dv = xp.matmul(xp.swapaxes(p, -1, -2), do)  # (N, h, S, Dv)
    dp = xp.matmul(do, xp.swapaxes(v, -1, -2))  # (N, h, L, S)
    # forward: p = e / e.sum(axis=-1, keepdims=True)   with e = exp(scores - max)
    ds = p * (dp - (p * dp).sum(axis=-1, keepdims=True))  # (N, h, L, S); the max shift and
    #     the -inf fill have zero gradient (masked entries have p = 0)
    # forward: scores = xp.matmul(q, xp.swapaxes(k, -1, -2)) * scale
    dq = xp.matmul(ds, k) * scale  # (N, h, L, D)
    dk = xp.matmul(xp.swapaxes(ds, -1, -2), q) * scale  # (N, h, S, D)
    return dq, dk, dv


def split_heads(t, heads: int):
    """(N, T, h*D) -> (N, h, T, D), diffusers' view(N, -1, heads, D).transpose(1, 2)"""
    n, t_len, inner = t.shape
    return t.reshape(n, t_len, heads, inner // heads).transpose(0, 2, 1, 3)


def merge_heads(t):
    """(N, h, T, D) -> (N, T, h*D), the inverse of split_heads"""
    n, h, t_len, d = t.shape
    return t.transpose(0, 2, 1, 3).reshape(n, t_len, h * d)


def _check_mha(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, context, mask) -> None:
    arrays = dict(x=x, wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo, context=context)
    for name, a in arrays.items():
        if a is not None:
            check_float(name, a)
            if a.dtype != x.dtype:
                raise ValueError(f"{name} must have the dtype of x ({x.dtype}), got {a.dtype}")
    check_same_backend(**arrays, mask=mask)
    check_ndim("x", x, 3, "(N, L, C)")
    ctx = x if context is None else context
    if context is not None:
        check_ndim("context", context, 3, "(N, S, Cc)")
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context must have the batch size of x ({x.shape[0]}), got shape "
                             f"{tuple(context.shape)}")
    if ctx.shape[1] < 1:
        raise ValueError(f"{'x' if context is None else 'context'} must hold at least one token, "
                         f"got shape {tuple(ctx.shape)}")
    check_ndim("wq", wq, 2, "(inner, C)")
    inner = wq.shape[0]
    check_shape("wq", wq, (inner, x.shape[2]), "(inner, C)")
    check_shape("wk", wk, (inner, ctx.shape[2]), "(inner, Cc)")
    check_shape("wv", wv, (inner, ctx.shape[2]), "(inner, Cc)")
    check_ndim("wo", wo, 2, "(C_out, inner)")
    check_shape("wo", wo, (wo.shape[0], inner), "(C_out, inner)")
    for name, b, size in (("bq", bq, inner), ("bk", bk, inner), ("bv", bv, inner), ("bo", bo, wo.shape[0])):
        if b is not None:
            check_shape(name, b, (size,), "(inner,)" if name != "bo" else "(C_out,)")
    if isinstance(heads, (bool, np.bool_)) or not isinstance(heads, (int, np.integer)) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    if inner % heads:
        raise ValueError(f"heads must divide the inner dim {inner} (= wq.shape[0]), got heads = {heads}")


def mha_forward(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, context=None, mask=None):
    """y = concat_h(sdpa(q_h, k_h, v_h)) wo^T + bo,  q = x wq^T + bq,  k = c wk^T + bk,  v = c wv^T + bv.

    c = context (cross-attention) or x itself (self-attention, context=None).

    x       (N, L, C)
    wq      (inner, C),  wk, wv (inner, Cc),  wo (C_out, inner);  bq, bk, bv (inner,), bo (C_out,), or None
    heads   int dividing inner; head dim D = inner / heads
    context (N, S, Cc) or None
    mask    (N, S) bool or None; True = attend to that key
    returns y (N, L, C_out), cache
    """
    _check_mha(x, wq, bq, wk, bk, wv, bv, wo, bo, heads, context, mask)
    ctx = x if context is None else context  # (N, S, Cc)

    q, q_cache = linear_forward(x, wq, bq)  # (N, L, inner)
    k, k_cache = linear_forward(ctx, wk, bk)  # (N, S, inner)
    v, v_cache = linear_forward(ctx, wv, bv)  # (N, S, inner)
    a, sdpa_cache = sdpa_forward(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads),
                                 mask)  # (N, h, L, D)
    a = merge_heads(a)  # (N, L, inner)
    y, out_cache = linear_forward(a, wo, bo)  # (N, L, C_out)

    cache = (
        context is None,  # self-attention: x fed q, k and v, so dcontext folds into dx
        heads,  # int: to split da into heads again
        q_cache, k_cache, v_cache,  # the projections' inputs (x, ctx) and weights (linear.py)
        sdpa_cache,  # q, k, v per head and the softmax probabilities (see sdpa_forward)
        out_cache,  # the merged attention output a (N, L, inner) and wo: dwo = dy^T a
    )
    return y, cache


def mha_backward(dy, cache):
    """Gradients of y = concat_h(sdpa(q_h, k_h, v_h)) wo^T + bo, in reverse order of mha_forward.

    dy (N, L, C_out), cache from mha_forward
    returns dx (N, L, C), dcontext (N, S, Cc) or None (self-attention: summed into dx),
            dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo   (a db is None where the bias was None)
    """
    self_attention, heads, q_cache, k_cache, v_cache, sdpa_cache, out_cache = cache
    check_float("dy", dy)

    # forward: y = linear_forward(a, wo, bo)
    da, dwo, dbo = linear_backward(dy, out_cache)  # (N, L, inner)
    # forward: a = merge_heads(sdpa_forward(q_h, k_h, v_h, mask))
    dq, dk, dv = sdpa_backward(split_heads(da, heads), sdpa_cache)  # per head
    dq, dk, dv = merge_heads(dq), merge_heads(dk), merge_heads(dv)  # (N, L|S, inner)
    # forward: v = linear(ctx, wv, bv);  k = linear(ctx, wk, bk);  q = linear(x, wq, bq)
    dctx_v, dwv, dbv = linear_backward(dv, v_cache)  # (N, S, Cc)
    dctx_k, dwk, dbk = linear_backward(dk, k_cache)  # (N, S, Cc)
    dx, dwq, dbq = linear_backward(dq, q_cache)  # (N, L, C)
    dcontext = dctx_k + dctx_v
    # forward: ctx = x if context is None else context  (self-attention: x feeds all three paths)
    if self_attention:
        dx, dcontext = dx + dcontext, None
    return dx, dcontext, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo
