"""The U-Net's encoder walk and its backward, shared by the noise-prediction U-Net (unet.py) and the
guidance classifier (classifier.py): the embeddings, conv_in, the down blocks and the mid block.

    temb = linear_2(silu(linear_1(sinusoid(t)))) [+ class_embedding[y]]
    ctx = context_embedding[ids]                    (cross-attention configs only: every attention reads it)
    h = conv_in(x);  skips = [h]
    down blocks (skips += every resnet/attention output and every downsampled h)
    h = mid_block(h, temb)

Shape legend: N batch, C_in image channels, H W spatial, C0 = block_out_channels[0],
Cl = block_out_channels[-1], h w = H W / 2**(levels - 1), T time-embedding width, S prompt tokens,
Cd = cross_attention_dim.
"""

from __future__ import annotations

import numpy as np

from ..backend import get_array_module, to_numpy
from ..nn._check import check_float, check_indices, check_ndim, check_shape
from .blocks import add_grad, down_block_backward, down_block_forward, mid_block_backward, mid_block_forward


def check_input(params, shapes: dict, config, x, what: str) -> None:
    """ValueError unless x is (N, in_channels, H, W) float with H, W multiples of 2**(levels - 1), and
    params holds exactly the keys of shapes (`what` names them), each of its shape and in x's dtype."""
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    N, _, H, W = x.shape
    n = len(config.block_out_channels)
    check_shape("x", x, (N, config.in_channels, H, W), "(N, in_channels, H, W)")
    if H % 2 ** (n - 1) or W % 2 ** (n - 1):
        raise ValueError(f"x's height and width must be multiples of {2 ** (n - 1)}, got {H}x{W}")
    if not isinstance(params, dict) or params.keys() != shapes.keys():
        got = set(params) if isinstance(params, dict) else set()
        missing, extra = sorted(set(shapes) - got)[:3], sorted(got - set(shapes))[:3]
        raise ValueError(f"params must hold exactly the keys of {what}; missing {missing}, unexpected {extra}")
    for key, shape in shapes.items():
        if tuple(params[key].shape) != shape or params[key].dtype != x.dtype:
            raise ValueError(f"params[{key!r}] must have shape {shape} and x's dtype {x.dtype}, got "
                             f"{tuple(params[key].shape)} {params[key].dtype}")


def _conditions(config, x, t, class_labels, context):
    """t (N,), class labels (N,) or None, prompt token ids (N, S) or None, checked and on x's backend.

    Labels and ids are checked on the host before the copy (no device sync); no context with
    cross-attention is the empty prompt, one padding token."""
    c, xp, N = config, get_array_module(x), x.shape[0]

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
    labels = ids = None
    if class_labels is not None:
        labels = as_array(class_labels)
        check_indices("class_labels", labels, c.num_class_embeds)
        labels = on_x_backend(labels)
        check_shape("class_labels", labels, (N,), "(N,)")
    if c.cross_attention_dim is not None:
        ids = np.zeros((N, 1), dtype=np.int64) if context is None else as_array(context)
        check_ndim("context", ids, 2, "(N, S)")
        check_shape("context", ids, (N, ids.shape[1]), "(N, S)")
        check_indices("context", ids, c.context_vocab_size)
        ids = on_x_backend(ids)
    return t, labels, ids


def encoder_forward(params, config, x, t, args, class_labels=None, context=None, for_backward=True):
    """h = mid_block(down_blocks(conv_in(x), temb), temb),  temb = time_mlp(sinusoid(t)) [+ class_embedding[y]]

    Inputs:  params, config, x (N, C_in, H, W), t, class_labels, context as unet_forward's (x and params
             already checked by check_input); args the BlockArgs of the call: this sets args.context
             (N, S, Cd) and args.context_mask (N, S) for the attention blocks; for_backward as unet_forward's.
    Returns: h (N, Cl, h, w), temb (N, T), skips (list, conv_in's output first), and the cache for
             encoder_backward (None when for_backward is False: each block's cache is dropped as it returns).
    """
    t, labels, ids = _conditions(config, x, t, class_labels, context)
    c, p, ops, n = config, params, args.ops, len(config.block_out_channels)
    # 1. time (and class) embedding -> temb (N, T); prompt tokens -> args.context (N, S, Cd)
    t_emb = ops.timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, dtype=x.dtype)
    e, lin1 = ops.linear_forward(t_emb, p["time_embedding.linear_1.weight"], p["time_embedding.linear_1.bias"])
    e, act = ops.silu_forward(e)  # (N, T)
    temb, lin2 = ops.linear_forward(e, p["time_embedding.linear_2.weight"], p["time_embedding.linear_2.bias"])
    cls = None
    if labels is not None:
        y_emb, cls = ops.embedding_forward(labels, p["class_embedding.weight"], check_ids=False)  # (N, T)
        temb = temb + y_emb  # (N, T)
    ctx = None
    if ids is not None:
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
    h, mid = mid_block_forward(p, "mid_block.", h, temb, heads, c.mid_block_scale_factor, args)  # (N, Cl, h, w)
    if not for_backward:
        return h, temb, skips, None
    cache = dict(
        ops=ops,  # the ops table that ran the forward: its backwards take these caches
        lin1=lin1, act=act, lin2=lin2,  # time-embedding MLP caches
        cls=cls,  # class-embedding lookup cache, or None
        ctx=ctx,  # prompt-token lookup cache, or None without cross-attention
        conv_in=conv_in,  # the stem's cache
        downs=downs,  # per down block: (block cache, how many skips it pushed)
        mid=mid,  # mid-block cache
        skips=len(skips),  # how many skips the walk made (a caller that drops them passes dskips=None)
    )
    return h, temb, skips, cache


def encoder_backward(dh, dskips, dtemb, dctx, cache, grads):
    """Backward of encoder_forward (4 -> 1); writes the encoder's parameter gradients into grads.

    Inputs:  dh (N, Cl, h, w); dskips the skips' gradients (same order; None: the skips were unused);
             dtemb (N, T) and dctx (N, S, Cd) what the caller's blocks sent back to temb and the
             context (None: nothing); cache from encoder_forward.
    Returns: dx (N, C_in, H, W).
    """
    g, k = grads, cache
    ops = k["ops"]
    dskips = [None] * k["skips"] if dskips is None else dskips  # None stands for a zero gradient
    # 4. mid -- forward: h = mid_block(h, temb)
    dh, dt, dc = mid_block_backward(dh, k["mid"], g)
    dtemb, dctx = add_grad(dtemb, dt), add_grad(dctx, dc)  # temb and the context feed every block: summed
    # 3. down -- forward: h, block_skips = down_block(h, temb); skips += block_skips
    for i in reversed(range(len(k["downs"]))):
        dc_block, count = k["downs"][i]
        dh, dt, dc = down_block_backward(dh, dskips[-count:], dc_block, g)
        dskips = dskips[:-count]
        dtemb, dctx = add_grad(dtemb, dt), add_grad(dctx, dc)
    # 2. conv_in -- forward: h = conv_in(x); skips = [h]   (h feeds down_blocks.0 and the first skip)
    dh = add_grad(dh, dskips[0])
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
    return dx
