"""The U-Net's attention block: diffusers' Attention(..., residual_connection=True,
_from_deprecated_attn_block=True) as UNet2DModel builds it, plus minidiff's optional
"added key/value" cross-attention (diffusers' AttnAddedKVProcessor) to prompt tokens.

    hn = GroupNorm(x)                          tokens of the image: (N, C, H, W) -> (N, L, C)
    q = to_q(hn);  k = to_k(hn);  v = to_v(hn)
    k = [add_k_proj(ctx); k],  v = [add_v_proj(ctx); v]          (only with a context)
    y = (to_out.0(softmax(q k^T / sqrt(D) + log m) v) + x) / rescale_output_factor

Shape legend: N batch, C channels, H W spatial, L = H*W image tokens, S context tokens,
Cd context width (cross_attention_dim), h heads, D = C / h head dim, T = S + L keys.

Parameters (flat dict, keys prefixed with e.g. "down_blocks.1.attentions.0."): group_norm.weight
(C,), group_norm.bias (C,), to_q / to_k / to_v / to_out.0 .weight (C, C) .bias (C,), and with
cross-attention add_k_proj / add_v_proj .weight (C, Cd) .bias (C,).
"""

from __future__ import annotations

from ..backend import get_array_module
from ..nn.attention import merge_heads, split_heads
from ..nn.ops import REFERENCE


def attention_block_forward(params, prefix, x, heads, groups, eps, context=None, context_mask=None,
                            rescale_output_factor=1.0, ops=REFERENCE):
    """y = (to_out(attention(GroupNorm(x))) + x) / rescale_output_factor   (see the module docstring)

    Inputs:  params the flat dict, prefix its key prefix for this block; x (N, C, H, W);
             heads h dividing C; groups, eps of the GroupNorm;
             context (N, S, Cd) prompt-token embeddings or None (plain self-attention);
             context_mask (N, S) bool, True = real token (False = padding, never attended to);
             ops: the table that runs each op (nn/ops.py).
    Returns: y (N, C, H, W), and the cache for attention_block_backward.
    """
    def p(name):  # this block's parameter called name
        return params[prefix + name]

    xp = get_array_module(x)
    N, C, H, W = x.shape
    L = H * W
    hn, norm_cache = ops.groupnorm_forward(x, p("group_norm.weight"), p("group_norm.bias"), groups, eps)
    tokens = hn.reshape(N, C, L).transpose(0, 2, 1)  # (N, L, C)
    q, q_cache = ops.linear_forward(tokens, p("to_q.weight"), p("to_q.bias"))  # (N, L, C)
    k, k_cache = ops.linear_forward(tokens, p("to_k.weight"), p("to_k.bias"))  # (N, L, C)
    v, v_cache = ops.linear_forward(tokens, p("to_v.weight"), p("to_v.bias"))  # (N, L, C)
    mask, ck_cache, cv_cache, S = None, None, None, 0
    if context is not None:
        S = context.shape[1]
        ck, ck_cache = ops.linear_forward(context, p("add_k_proj.weight"), p("add_k_proj.bias"))  # (N, S, C)
        cv, cv_cache = ops.linear_forward(context, p("add_v_proj.weight"), p("add_v_proj.bias"))  # (N, S, C)
        k = xp.concatenate([ck, k], axis=1)  # (N, T, C): context keys first, as AttnAddedKVProcessor
        v = xp.concatenate([cv, v], axis=1)  # (N, T, C)
        mask = xp.concatenate([context_mask, xp.ones((N, L), dtype=bool)], axis=1)  # (N, T)
    # every row keeps its L image tokens, so the mask needs no check (which would read it to the host)
    o, sdpa_cache = ops.sdpa_forward(split_heads(q, heads), split_heads(k, heads), split_heads(v, heads), mask,
                                 check_mask=False)
    o = merge_heads(o)  # (N, L, C)
    out, out_cache = ops.linear_forward(o, p("to_out.0.weight"), p("to_out.0.bias"))  # (N, L, C)
    out = out.transpose(0, 2, 1).reshape(N, C, H, W)  # (N, C, H, W)
    y = (out + x) / rescale_output_factor  # (N, C, H, W) residual connection, then rescale
    cache = (
        ops,  # the ops table that ran the forward
        prefix,  # the key prefix, so the backward names its gradients
        (N, C, H, W),  # x's shape, to fold tokens back into an image
        heads,  # h, to split and merge the heads of the gradients
        S,  # context tokens (0 without a context): where the keys split into context and image parts
        rescale_output_factor,  # the output divisor
        norm_cache, q_cache, k_cache, v_cache,  # the op caches (inputs referenced, not copied)
        ck_cache, cv_cache,  # the added key/value projections' caches (None without a context)
        sdpa_cache,  # q, k, v and the attention probabilities p (N, h, L, T)
        out_cache,  # to_out.0's input o (N, L, C)
    )
    return y, cache


def attention_block_backward(dy, cache, grads):
    """Backward of attention_block_forward; writes this block's parameter gradients into grads.

    Inputs:  dy (N, C, H, W) upstream gradient; cache from attention_block_forward;
             grads the dict that receives "<prefix>to_q.weight", ... (fresh arrays).
    Returns: dx (N, C, H, W), dcontext (N, S, Cd) or None without a context.
    """
    (ops, prefix, (N, C, H, W), heads, S, rescale, norm_cache, q_cache, k_cache, v_cache,
     ck_cache, cv_cache, sdpa_cache, out_cache) = cache
    L = H * W

    def put(name, dw, db):
        grads[prefix + name + ".weight"], grads[prefix + name + ".bias"] = dw, db

    # forward: y = (out + x) / rescale_output_factor
    dout = dy / rescale  # (N, C, H, W)
    dx_residual = dy / rescale  # (N, C, H, W) the residual path
    # forward: out = out.transpose(0, 2, 1).reshape(N, C, H, W)
    dout = dout.reshape(N, C, L).transpose(0, 2, 1)  # (N, L, C)
    # forward: out = ops.linear_forward(o, to_out.0)
    do, dw, db = ops.linear_backward(dout, out_cache)
    put("to_out.0", dw, db)
    # forward: o = merge_heads(sdpa(split(q), split(k), split(v), mask))
    dq, dk, dv = ops.sdpa_backward(split_heads(do, heads), sdpa_cache)
    dq, dk, dv = merge_heads(dq), merge_heads(dk), merge_heads(dv)  # (N, L, C), (N, T, C), (N, T, C)
    dcontext = None
    if ck_cache is not None:
        # forward: k = concatenate([ck, k], axis=1);  v = concatenate([cv, v], axis=1)
        dck, dk = dk[:, :S], dk[:, S:]  # (N, S, C), (N, L, C)
        dcv, dv = dv[:, :S], dv[:, S:]  # (N, S, C), (N, L, C)
        # forward: cv = add_v_proj(context);  ck = add_k_proj(context)   (context feeds both: summed)
        dctx_v, dw, db = ops.linear_backward(dcv, cv_cache)
        put("add_v_proj", dw, db)
        dctx_k, dw, db = ops.linear_backward(dck, ck_cache)
        put("add_k_proj", dw, db)
        dcontext = dctx_k + dctx_v  # (N, S, Cd)
    # forward: q, k, v = to_q(tokens), to_k(tokens), to_v(tokens)   (tokens feed all three: summed)
    dtok_v, dw, db = ops.linear_backward(dv, v_cache)
    put("to_v", dw, db)
    dtok_k, dw, db = ops.linear_backward(dk, k_cache)
    put("to_k", dw, db)
    dtok_q, dw, db = ops.linear_backward(dq, q_cache)
    put("to_q", dw, db)
    dtokens = dtok_q + dtok_k + dtok_v  # (N, L, C)
    # forward: tokens = hn.reshape(N, C, L).transpose(0, 2, 1)
    dhn = dtokens.transpose(0, 2, 1).reshape(N, C, H, W)  # (N, C, H, W)
    # forward: hn = ops.groupnorm_forward(x, group_norm)
    dx, dgamma, dbeta = ops.groupnorm_backward(dhn, norm_cache)
    put("group_norm", dgamma, dbeta)
    # forward: x feeds the GroupNorm and the residual (fan-in summed)
    dx = dx + dx_residual  # (N, C, H, W)
    return dx, dcontext
