"""The noise-prediction U-Net (Ho et al. 2020, sec. 4 and appendix B), diffusers' UNet2DModel
op for op, with its hand-written backward.

    temb = linear_2(silu(linear_1(sinusoid(t)))) [+ class_embedding[y]]
    h = conv_in(x);  skips = [h]
    down blocks (skips += every resnet/attention output and every downsampled h)
    mid block
    up blocks (each resnet eats concat(h, skips.pop()))
    eps = conv_out(silu(GroupNorm(h)))

Shape legend: N batch, C_in / C_out image channels, H W spatial, C0 = block_out_channels[0],
T = time-embedding width (4 C0 by default), S prompt tokens, Cd = cross_attention_dim.

Parameters are one flat dict with UNet2DModel's state-dict names and PyTorch layouts, in the
order of its state_dict; their names, shapes and initialization live in unet_params.py (and are
re-exported here). Gradients come back under exactly the same keys.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy
from .blocks import (
    BlockArgs,
    down_block_backward,
    down_block_forward,
    mid_block_backward,
    mid_block_forward,
    up_block_backward,
    up_block_forward,
)
from ..nn._check import check_float, check_indices, check_ndim, check_shape
from ..nn.ops import REFERENCE
from .dropout import draw_dropout_masks
from .params import count_params, init_params, param_shapes, print_param_counts

__all__ = ["unet_forward", "unet_backward", "init_params", "param_shapes", "count_params", "print_param_counts"]


def _check_params(params, config, x) -> None:
    """ValueError unless params holds exactly param_shapes(config), in x's dtype."""
    shapes = param_shapes(config)
    if not isinstance(params, dict) or params.keys() != shapes.keys():
        got = set(params) if isinstance(params, dict) else set()
        missing, extra = sorted(set(shapes) - got)[:3], sorted(got - set(shapes))[:3]
        raise ValueError(f"params must hold exactly the keys of param_shapes(config); missing {missing}, "
                         f"unexpected {extra}")
    for key, shape in shapes.items():
        if tuple(params[key].shape) != shape or params[key].dtype != x.dtype:
            raise ValueError(f"params[{key!r}] must have shape {shape} and x's dtype {x.dtype}, got "
                             f"{tuple(params[key].shape)} {params[key].dtype}")


def _add(a, b):
    """a + b where None stands for zero (a block without attention has no context gradient)."""
    return b if a is None else a if b is None else a + b


def _as_rng(rng):
    """The host generator that draws one dropout seed per resnet, in forward order."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__}")


def unet_forward(params, config, x, t, class_labels=None, context=None, train=False, rng=None,
                 dropout_masks=None, for_backward=True, ops=REFERENCE):
    """eps = UNet(x_t, t[, y][, prompt])   (UNet2DModel.forward, op for op)

    Inputs:  params from init_params (or load_pretrained), config its UNetConfig;
             x (N, C_in, H, W) float32/float64, H and W multiples of 2**(len(block_out_channels)-1);
             t int or float, a scalar or (N,); class_labels (N,) ints in [0, num_class_embeds)
             (required iff num_class_embeds is set); context (N, S) int token ids in
             [0, context_vocab_size), id 0 = padding (None = empty prompt; cross-attention configs only);
             train: dropout on; dropout_masks: {resnet prefix: keep-mask} (model/dropout.py), or None to
             draw them here from rng (None, an int seed or a np.random.Generator);
             for_backward=False (inference, like torch.no_grad): each block's cache is dropped as soon
             as the block returns, so its activations are freed (sampling memory: docs/performance.md);
             ops: the table that runs each op (nn/ops.py: REFERENCE, or minidiff.fast's FAST).
    Returns: eps (N, C_out, H, W), and the cache for unet_backward (an independent object per call;
             None when for_backward is False).
    """
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    c, xp = config, get_array_module(x)
    N, _, H, W = x.shape
    n = len(c.block_out_channels)
    check_shape("x", x, (N, c.in_channels, H, W), "(N, in_channels, H, W)")
    if H % 2 ** (n - 1) or W % 2 ** (n - 1):
        raise ValueError(f"x's height and width must be multiples of {2 ** (n - 1)}, got {H}x{W}")
    _check_params(params, c, x)

    def on_x_backend(a):  # lists, NumPy or CuPy arrays -> arrays on x's backend
        return xp.asarray(to_numpy(a) if xp is np else a)

    def as_array(a):  # lists -> NumPy; arrays stay where they are (host labels are checked without a sync)
        return a if hasattr(a, "dtype") else np.asarray(a)

    t = on_x_backend(t)
    t = xp.broadcast_to(t, (N,)) if t.ndim == 0 else t
    check_shape("t", t, (N,), "(N,) or a scalar")
    if (class_labels is None) != (c.num_class_embeds is None):
        given = "None" if class_labels is None else "given"
        raise ValueError("class_labels must be given exactly when config.num_class_embeds is set "
                         f"(num_class_embeds={c.num_class_embeds}, class_labels {given})")
    if context is not None and c.cross_attention_dim is None:
        raise ValueError("context must be None: config.cross_attention_dim is None (no cross-attention)")
    if train and c.dropout > 0 and dropout_masks is None:
        dropout_masks = draw_dropout_masks(c, _as_rng(rng), x.shape, xp)
    args = BlockArgs(c.norm_num_groups, c.norm_eps, c.dropout, train, dropout_masks, ops=ops)
    p = params

    # 1. time (and class) embedding -> temb (N, T)
    t_emb = ops.timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, dtype=x.dtype)
    e, lin1 = ops.linear_forward(t_emb, p["time_embedding.linear_1.weight"], p["time_embedding.linear_1.bias"])
    e, act = ops.silu_forward(e)  # (N, T)
    temb, lin2 = ops.linear_forward(e, p["time_embedding.linear_2.weight"], p["time_embedding.linear_2.bias"])
    cls = None
    if class_labels is not None:
        labels = as_array(class_labels)
        check_indices("class_labels", labels, c.num_class_embeds)  # before the copy: host labels, no sync
        labels = on_x_backend(labels)
        check_shape("class_labels", labels, (N,), "(N,)")
        y_emb, cls = ops.embedding_forward(labels, p["class_embedding.weight"], check_ids=False)  # (N, T)
        temb = temb + y_emb  # (N, T)
    ctx = None
    if c.cross_attention_dim is not None:
        ids = np.zeros((N, 1), dtype=np.int64) if context is None else as_array(context)  # empty: 1 pad
        check_ndim("context", ids, 2, "(N, S)")
        check_shape("context", ids, (N, ids.shape[1]), "(N, S)")
        check_indices("context", ids, c.context_vocab_size)  # before the copy: host ids, no sync
        ids = on_x_backend(ids)
        args.context, ctx = ops.embedding_forward(ids, p["context_embedding.weight"], check_ids=False)  # (N, S, Cd)
        args.context_mask = ids != 0  # (N, S) padding (id 0) is never attended to
    # 2. conv_in
    h, conv_in = ops.conv2d_forward(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)  # (N, C0, H, W)
    skips = [h]
    # 3. down
    downs = []
    for i, kind in enumerate(c.down_block_types):
        heads = c.heads(c.block_out_channels[i]) if kind == "AttnDownBlock2D" else None
        h, block_skips, dc = down_block_forward(p, f"down_blocks.{i}.", h, temb, c.layers_per_block, heads,
                                                i < n - 1, c.downsample_padding, args)
        skips += block_skips
        downs.append((dc if for_backward else None, len(block_skips)))
    # 4. mid
    heads = c.heads(c.block_out_channels[-1]) if c.add_attention else None
    h, mid = mid_block_forward(p, "mid_block.", h, temb, heads, c.mid_block_scale_factor, args)
    mid = mid if for_backward else None
    # 5. up
    ups = []
    for i, kind in enumerate(c.up_block_types):
        heads = c.heads(c.block_out_channels[::-1][i]) if kind == "AttnUpBlock2D" else None
        block_skips, skips = skips[-(c.layers_per_block + 1):], skips[:-(c.layers_per_block + 1)]
        h, uc = up_block_forward(p, f"up_blocks.{i}.", h, block_skips, temb, heads, i < n - 1, args)
        ups.append(uc if for_backward else None)
        del block_skips, uc  # without a backward the skips are freed here
    # 6. out
    h, norm_act_out = ops.groupnorm_silu_forward(h, p["conv_norm_out.weight"], p["conv_norm_out.bias"],
                                             c.norm_num_groups, c.norm_eps)  # silu(conv_norm_out(h))
    eps, conv_out = ops.conv2d_forward(h, p["conv_out.weight"], p["conv_out.bias"], padding=1)  # (N, C_out, H, W)
    if not for_backward:
        return eps, None
    cache = dict(
        ops=ops,  # the ops table that ran the forward: its backwards take these caches
        keys=tuple(p),  # the params' keys, to return grads in the same order
        lin1=lin1, act=act, lin2=lin2,  # time-embedding MLP caches
        cls=cls,  # class-embedding lookup cache, or None
        ctx=ctx,  # prompt-token lookup cache, or None without cross-attention
        conv_in=conv_in,  # caches of the stem
        downs=downs,  # per down block: (block cache, how many skips it pushed)
        mid=mid,  # mid-block cache
        ups=ups,  # per up block: its cache
        norm_act_out=norm_act_out, conv_out=conv_out,  # caches of the output head
    )
    return eps, cache


def unet_backward(deps, cache):
    """Gradients of L with dL/deps = deps through unet_forward, in reverse (6 -> 1).

    Inputs:  deps (N, C_out, H, W) the upstream gradient; cache from unet_forward.
    Returns: grads {key: array} with exactly params' keys (same order), dx (N, C_in, H, W).
    """
    check_float("deps", deps)
    g, k = {}, cache
    ops = k["ops"]
    # 6. out -- forward: eps = conv_out(silu(conv_norm_out(h)))
    dh, g["conv_out.weight"], g["conv_out.bias"] = ops.conv2d_backward(deps, k["conv_out"])
    dh, g["conv_norm_out.weight"], g["conv_norm_out.bias"] = ops.groupnorm_silu_backward(dh, k["norm_act_out"])
    # 5. up -- forward: h = up_block(h, skips.pop(layers + 1), temb); each block took the LAST skips,
    # so walking the blocks backwards rebuilds the skip gradients in push order
    dtemb, dctx, dskips = None, None, []
    for i in reversed(range(len(k["ups"]))):
        dh, dblock_skips, dt, dc = up_block_backward(dh, k["ups"][i], g)
        dskips += dblock_skips
        dtemb, dctx = _add(dtemb, dt), _add(dctx, dc)  # temb and the context feed every block: summed
    # 4. mid -- forward: h = mid_block(h, temb)
    dh, dt, dc = mid_block_backward(dh, k["mid"], g)
    dtemb, dctx = _add(dtemb, dt), _add(dctx, dc)
    # 3. down -- forward: h, block_skips = down_block(h, temb); skips += block_skips
    for i in reversed(range(len(k["downs"]))):
        dc_block, count = k["downs"][i]
        dh, dt, dc = down_block_backward(dh, dskips[-count:], dc_block, g)
        dskips = dskips[:-count]
        dtemb, dctx = _add(dtemb, dt), _add(dctx, dc)
    # 2. conv_in -- forward: h = conv_in(x); skips = [h]   (h feeds down_blocks.0 and the first skip)
    dh = dh + dskips[0]
    dx, g["conv_in.weight"], g["conv_in.bias"] = ops.conv2d_backward(dh, k["conv_in"])
    # 1. embeddings -- forward: args.context = context_embedding[ids]
    if k["ctx"] is not None:
        g["context_embedding.weight"] = ops.embedding_backward(dctx, k["ctx"])
    # forward: temb = temb + class_embedding[class_labels]
    if k["cls"] is not None:
        g["class_embedding.weight"] = ops.embedding_backward(dtemb, k["cls"])
    # forward: temb = linear_2(silu(linear_1(t_emb)))   (t_emb has no parameters: its gradient is dropped)
    de, g["time_embedding.linear_2.weight"], g["time_embedding.linear_2.bias"] = ops.linear_backward(dtemb, k["lin2"])
    de = ops.silu_backward(de, k["act"])
    _, g["time_embedding.linear_1.weight"], g["time_embedding.linear_1.bias"] = ops.linear_backward(de, k["lin1"])
    return {key: g[key] for key in k["keys"]}, dx
