"""The U-Net's blocks, each a forward/backward pair: diffusers' ResnetBlock2D, DownBlock2D /
AttnDownBlock2D, UNetMidBlock2D and UpBlock2D / AttnUpBlock2D, in the same order of operations.

    resnet:  h = conv1(silu(GroupNorm(x))) + time_emb_proj(silu(temb))[:, :, None, None]
             h = conv2(dropout(silu(GroupNorm(h))));   y = (shortcut(x) + h) / output_scale_factor
    down:    [resnet -> (attention)] x layers, each output kept as a skip; then a stride-2 conv
             (also kept as a skip)
    mid:     resnet -> (attention -> resnet)
    up:      [concat(h, skip) -> resnet -> (attention)] x (layers + 1), skips taken last first;
             then 2x nearest upsampling and a 3x3 conv

Shape legend: N batch, C channels (C_in into a block, C_out out of it), H W spatial,
T time-embedding width, S context tokens, Cd context width.

Parameters are the flat dict with diffusers' state-dict names; each block gets a key prefix
("down_blocks.1.", "mid_block.", ...). Backwards write their parameter gradients into a `grads`
dict under the same keys and return the input gradients; fan-in is summed where it happens.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..backend import get_array_module
from ..nn.ops import REFERENCE, Ops
from .attention_block import attention_block_backward, attention_block_forward


@dataclass
class BlockArgs:
    """What every block of one network call shares."""

    groups: int  # GroupNorm groups (norm_num_groups)
    eps: float  # GroupNorm epsilon (norm_eps)
    dropout: float = 0.0  # resnet dropout probability
    train: bool = False  # dropout on (True) or identity (False)
    masks: dict | None = None  # {resnet prefix: keep-mask (N, C_out, H, W)} when training with dropout (dropout.py)
    context: object = None  # (N, S, Cd) prompt-token embeddings for cross-attention, or None
    context_mask: object = None  # (N, S) bool, True = real token
    ops: Ops = REFERENCE  # the table that runs each op (nn/ops.py)


def _put(grads, key, dw, db):
    grads[key + ".weight"], grads[key + ".bias"] = dw, db


def resnet_block_forward(params, prefix, x, temb, args: BlockArgs, output_scale_factor=1.0):
    """y = (shortcut(x) + conv2(dropout(silu(GN2(conv1(silu(GN1(x))) + W_t silu(temb)))))) / output_scale_factor

    shortcut is a 1x1 conv (conv_shortcut) when C_in != C_out, else the identity.
    Inputs:  x (N, C_in, H, W); temb (N, T) the time (+ class) embedding; args the shared settings.
    Returns: y (N, C_out, H, W), and the cache for resnet_block_backward.
    """
    def p(name):  # this block's parameter called name
        return params[prefix + name]

    ops = args.ops
    h, norm_act1 = ops.groupnorm_silu_forward(x, p("norm1.weight"), p("norm1.bias"), args.groups, args.eps)  # GN1, silu
    h, conv1 = ops.conv2d_forward(h, p("conv1.weight"), p("conv1.bias"), padding=1)  # (N, C_out, H, W)
    e, temb_act = ops.silu_forward(temb)  # (N, T)
    e, temb_proj = ops.linear_forward(e, p("time_emb_proj.weight"), p("time_emb_proj.bias"))  # (N, C_out)
    h += e[:, :, None, None]  # (N, C_out, H, W) the time embedding, one shift per channel (in place)
    h, norm_act2 = ops.groupnorm_silu_forward(h, p("norm2.weight"), p("norm2.bias"), args.groups, args.eps)
    drop = None  # dropout is the identity unless training with p > 0: no op, no copy
    if args.train and args.dropout > 0:
        h, drop = ops.dropout_forward(h, args.dropout, train=True, mask=args.masks[prefix])
    h, conv2 = ops.conv2d_forward(h, p("conv2.weight"), p("conv2.bias"), padding=1)  # (N, C_out, H, W)
    skip, shortcut = x, None
    if prefix + "conv_shortcut.weight" in params:
        skip, shortcut = ops.conv2d_forward(x, p("conv_shortcut.weight"), p("conv_shortcut.bias"))  # (N, C_out, H, W)
    h += skip  # (N, C_out, H, W) conv2's output, in place: y = (skip + h) / output_scale_factor
    if output_scale_factor != 1:
        h /= output_scale_factor
    y = h
    cache = (
        ops,  # the ops table that ran the forward: its backwards take these caches
        prefix,  # the key prefix, so the backward names its gradients
        output_scale_factor,  # the output divisor
        norm_act1, conv1, temb_act, temb_proj, norm_act2, drop, conv2,  # op caches, in forward order
        shortcut,  # the 1x1 conv's cache, or None for the identity shortcut
    )
    return y, cache


def resnet_block_backward(dy, cache, grads):
    """Backward of resnet_block_forward; writes the block's parameter gradients into grads.

    Returns: dx (N, C_in, H, W), dtemb (N, T).
    """
    ops, prefix, osf, norm_act1, conv1, temb_act, temb_proj, norm_act2, drop, conv2, shortcut = cache
    # forward: y = (skip + h) / output_scale_factor
    dh = dy / osf if osf != 1 else dy  # (N, C_out, H, W) (no op mutates its dy: no copy needed)
    dskip = dh
    # forward: skip = conv_shortcut(x)   (or skip = x)
    dx_skip = dskip
    if shortcut is not None:
        dx_skip, dw, db = ops.conv2d_backward(dskip, shortcut)
        _put(grads, prefix + "conv_shortcut", dw, db)
    # forward: h = conv2(h)
    dh, dw, db = ops.conv2d_backward(dh, conv2)
    _put(grads, prefix + "conv2", dw, db)
    # forward: h = dropout(h);  h = silu(h);  h = norm2(h)
    if drop is not None:
        dh = ops.dropout_backward(dh, drop)
    dh, dgamma, dbeta = ops.groupnorm_silu_backward(dh, norm_act2)
    _put(grads, prefix + "norm2", dgamma, dbeta)
    # forward: h = h + e[:, :, None, None]
    de = dh.sum(axis=(2, 3))  # (N, C_out)
    # forward: e = time_emb_proj(silu(temb))
    de, dw, db = ops.linear_backward(de, temb_proj)
    _put(grads, prefix + "time_emb_proj", dw, db)
    dtemb = ops.silu_backward(de, temb_act)  # (N, T)
    # forward: h = conv1(silu(norm1(x)))
    dh, dw, db = ops.conv2d_backward(dh, conv1)
    _put(grads, prefix + "conv1", dw, db)
    dx, dgamma, dbeta = ops.groupnorm_silu_backward(dh, norm_act1)
    _put(grads, prefix + "norm1", dgamma, dbeta)
    # forward: x feeds norm1 and the shortcut (fan-in summed)
    dx += dx_skip  # (N, C_in, H, W) in place: dx is groupnorm_silu_backward's new array
    return dx, dtemb


def add_grad(a, b):
    """a + b where None stands for zero (the context gradient of blocks without attention, the
    gradient of a skip that nothing read)."""
    return b if a is None else a if b is None else a + b


def _layer_forward(params, prefix, i, h, temb, heads, args, scale=1.0):
    """resnets.i, then attentions.i when heads is not None."""
    h, rc = resnet_block_forward(params, f"{prefix}resnets.{i}.", h, temb, args, scale)
    ac = None
    if heads is not None:
        h, ac = attention_block_forward(params, f"{prefix}attentions.{i}.", h, heads, args.groups, args.eps,
                                        args.context, args.context_mask, scale, ops=args.ops)
    return h, (rc, ac)


def _layer_backward(dh, cache, grads):
    """Backward of _layer_forward: returns dh, dtemb, dcontext (or None)."""
    rc, ac = cache
    dctx = None
    if ac is not None:
        # forward: h = attention_block(h)
        dh, dctx = attention_block_backward(dh, ac, grads)
    # forward: h = resnet_block(h, temb)
    dh, dtemb = resnet_block_backward(dh, rc, grads)
    return dh, dtemb, dctx


def down_block_forward(params, prefix, x, temb, num_layers, heads, add_downsample, downsample_padding,
                       args: BlockArgs):
    """DownBlock2D (heads None) / AttnDownBlock2D: [h = attn_i(resnet_i(h)); skips += h] for each layer,
    then h = downsample(h); skips += h.   The block's output is always skips[-1].

    Inputs:  x (N, C_in, H, W); temb (N, T); heads None (no attention) or the attention heads;
             downsample_padding 0 (pad right/bottom by 1) or 1.
    Returns: h (N, C_out, H', W') with H' = H/2 when downsampling, skips (list), the cache.
    """
    h, skips, layers, down = x, [], [], None
    for i in range(num_layers):
        h, lc = _layer_forward(params, prefix, i, h, temb, heads, args)  # (N, C_out, H, W)
        skips.append(h)
        layers.append(lc)
    if add_downsample:
        w, b = params[prefix + "downsamplers.0.conv.weight"], params[prefix + "downsamplers.0.conv.bias"]
        h, down = args.ops.downsample_forward(h, w, b, padding=downsample_padding)  # (N, C_out, H/2, W/2)
        skips.append(h)
    cache = (
        args.ops,  # the ops table that ran the forward
        prefix,  # the key prefix
        layers,  # one (resnet cache, attention cache or None) per layer
        down,  # the downsampling conv's cache, or None
    )
    return h, skips, cache


def down_block_backward(dh, dskips, cache, grads):
    """Backward of down_block_forward. dskips: the gradients of the skips (same order; None where
    nothing read the skip, as in the classifier).

    Returns: dx (N, C_in, H, W), dtemb (N, T), dcontext (N, S, Cd) or None.
    """
    ops, prefix, layers, down = cache
    dtemb, dctx = None, None
    if down is not None:
        # forward: h = downsample(h); skips.append(h)   (h is the output and a skip: fan-in)
        dh = add_grad(dh, dskips[-1])
        dh, dw, db = ops.downsample_backward(dh, down)
        _put(grads, prefix + "downsamplers.0.conv", dw, db)
    for i in reversed(range(len(layers))):
        # forward: h = layer_i(h); skips.append(h)
        dh = add_grad(dh, dskips[i])
        dh, dt, dc = _layer_backward(dh, layers[i], grads)
        dtemb, dctx = add_grad(dtemb, dt), add_grad(dctx, dc)
    return dh, dtemb, dctx


def mid_block_forward(params, prefix, x, temb, heads, output_scale_factor, args: BlockArgs):
    """UNetMidBlock2D: h = resnets.0(x), then (heads not None) h = resnets.1(attentions.0(h)); else
    h = resnets.1(h). Every output is divided by output_scale_factor (mid_block_scale_factor).

    Returns: h (N, C, H, W), the cache.
    """
    h, first = resnet_block_forward(params, prefix + "resnets.0.", x, temb, args, output_scale_factor)
    attn = None
    if heads is not None:
        h, attn = attention_block_forward(params, prefix + "attentions.0.", h, heads, args.groups, args.eps,
                                          args.context, args.context_mask, output_scale_factor, ops=args.ops)
    h, second = resnet_block_forward(params, prefix + "resnets.1.", h, temb, args, output_scale_factor)
    cache = (
        first,  # resnets.0's cache
        attn,  # attentions.0's cache, or None without mid-block attention
        second,  # resnets.1's cache
    )
    return h, cache


def mid_block_backward(dh, cache, grads):
    """Backward of mid_block_forward. Returns dx, dtemb, dcontext (or None)."""
    first, attn, second = cache
    # forward: h = resnets.1(h, temb)
    dh, dtemb = resnet_block_backward(dh, second, grads)
    dctx = None
    if attn is not None:
        # forward: h = attentions.0(h)
        dh, dctx = attention_block_backward(dh, attn, grads)
    # forward: h = resnets.0(x, temb)   (temb feeds both resnets: summed)
    dx, dt = resnet_block_backward(dh, first, grads)
    return dx, dtemb + dt, dctx


def up_block_forward(params, prefix, x, skips, temb, heads, add_upsample, args: BlockArgs):
    """UpBlock2D (heads None) / AttnUpBlock2D: for each layer i, h = concat([h, skips[-1 - i]]) along
    channels, h = attn_i(resnet_i(h)); then h = conv(upsample_nearest2x(h)).

    Inputs:  x (N, C_prev, H, W); skips the list of this block's skips (len = layers), taken last first.
    Returns: h (N, C_out, H', W') with H' = 2H when upsampling, the cache.
    """
    xp = get_array_module(x)
    h, layers, widths = x, [], []
    for i in range(len(skips)):
        widths.append(h.shape[1])
        h = xp.concatenate([h, skips[-1 - i]], axis=1)  # (N, C_h + C_skip, H, W)
        h, lc = _layer_forward(params, prefix, i, h, temb, heads, args)  # (N, C_out, H, W)
        layers.append(lc)
    up = None
    if add_upsample:
        h, up_cache = args.ops.upsample_nearest2x_forward(h)  # (N, C_out, 2H, 2W)
        w, b = params[prefix + "upsamplers.0.conv.weight"], params[prefix + "upsamplers.0.conv.bias"]
        h, conv_cache = args.ops.conv2d_forward(h, w, b, padding=1)  # (N, C_out, 2H, 2W)
        up = (up_cache, conv_cache)
    cache = (
        args.ops,  # the ops table that ran the forward
        prefix,  # the key prefix
        layers,  # one (resnet cache, attention cache or None) per layer
        widths,  # channels of h before each concat: where the gradient splits into h and the skip
        up,  # (nearest-upsampling cache, conv cache), or None
    )
    return h, cache


def up_block_backward(dh, cache, grads):
    """Backward of up_block_forward. Returns dx, dskips (list, same order as skips), dtemb, dcontext."""
    ops, prefix, layers, widths, up = cache
    if up is not None:
        up_cache, conv_cache = up
        # forward: h = conv(h);  h = upsample_nearest2x(h)
        dh, dw, db = ops.conv2d_backward(dh, conv_cache)
        _put(grads, prefix + "upsamplers.0.conv", dw, db)
        dh = ops.upsample_nearest2x_backward(dh, up_cache)
    dtemb, dctx, dskips = None, None, [None] * len(layers)
    for i in reversed(range(len(layers))):
        dh, dt, dc = _layer_backward(dh, layers[i], grads)
        dtemb, dctx = add_grad(dtemb, dt), add_grad(dctx, dc)
        # forward: h = concatenate([h, skips[-1 - i]], axis=1)
        dh, dskips[-1 - i] = dh[:, :widths[i]], dh[:, widths[i]:]
    return dh, dskips, dtemb, dctx
