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
order of its state_dict; their names, shapes and initialization live in params.py (and are
re-exported here). The encoder walk (embeddings, conv_in, down, mid) is encoder.py's, shared with
the guidance classifier. Gradients come back under exactly the same keys.
"""

from __future__ import annotations

from ..backend import get_array_module
from .blocks import BlockArgs, add_grad, up_block_backward, up_block_forward
from ..nn._check import check_float
from ..nn.ops import REFERENCE
from .dropout import as_rng, draw_dropout_masks
from .encoder import check_input, encoder_backward, encoder_forward
from .params import count_params, init_params, param_shapes, print_param_counts

__all__ = ["unet_forward", "unet_backward", "init_params", "param_shapes", "count_params", "print_param_counts"]


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
    check_input(params, param_shapes(config), config, x, "param_shapes(config)")
    c, p, n = config, params, len(config.block_out_channels)
    if train and c.dropout > 0 and dropout_masks is None:
        dropout_masks = draw_dropout_masks(c, as_rng(rng), x.shape, get_array_module(x))
    args = BlockArgs(c.norm_num_groups, c.norm_eps, c.dropout, train, dropout_masks, ops=ops)
    # 1.-4. embeddings, conv_in, down blocks, mid block (encoder.py) -> h, temb (N, T), skips
    h, temb, skips, encoder = encoder_forward(p, c, x, t, args, class_labels, context, for_backward)
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
        encoder=encoder,  # the encoder walk's cache (embeddings, conv_in, down and mid blocks)
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
        dtemb, dctx = add_grad(dtemb, dt), add_grad(dctx, dc)  # temb and the context feed every block: summed
    # 4.-1. forward: h, temb, skips, encoder = encoder_forward(x, t, class_labels, context)
    dx = encoder_backward(dh, dskips, dtemb, dctx, k["encoder"], g)
    return {key: g[key] for key in k["keys"]}, dx


def unet_apply(params, config, x, t, class_labels=None, context=None, ops=REFERENCE):
    """eps = UNet(x_t, t[, y][, prompt]) and nothing else: unet_forward(..., for_backward=False)[0], for callers
    (an oracle check, a sampler's model_fn) that need no backward. Returns (N, C_out, H, W)."""
    return unet_forward(params, config, x, t, class_labels, context, for_backward=False, ops=ops)[0]
