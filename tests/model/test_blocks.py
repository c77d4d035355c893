"""The U-Net's blocks (minidiff/model/blocks.py), each on its own: centered finite differences in
float64 through a random upstream gradient, for every parameter of the block and every input
(x, temb, the skips, the prompt context), and a backward that leaves its upstream gradients and
its cache untouched.

Blocks come from the `tiny` preset's parameters (GroupNorm scales and shifts moved off 1 and 0,
so their gradients are generic), N = 2 at 4x4 or 8x8. A block with several outputs (a down block's
h and its skips) is checked through L = sum_i sum(g_i * output_i), one random g_i per output.

Tolerance 1e-7 relative, h = 1e-5: a block is ~10 to 30 smooth ops, its loss is O(10), so the
centered difference carries ~1e-10 absolute noise against sampled gradients of >= ~1e-3; a wrong
backward errs by O(1). (check_grads also floors the scale at the differences' own rounding.)

Shape legend: N batch, C channels, H W spatial, T time-embedding width, S prompt tokens, Cd their width.
"""

import dataclasses

import numpy as np
import pytest
from gradcheck import check_grads
from purity import assert_same, snapshot

from minidiff.model.blocks import (BlockArgs, down_block_backward, down_block_forward, mid_block_backward,
                                   mid_block_forward, resnet_block_backward, resnet_block_forward,
                                   up_block_backward, up_block_forward)
from minidiff.model.config import get_preset
from minidiff.model.params import init_params
from minidiff.nn.dropout import dropout_mask

TINY = get_preset("tiny")  # channels (8, 16), 4 groups, T = 32, attention with 2 heads at 16 channels
CROSS = dataclasses.replace(TINY, cross_attention_dim=6, context_vocab_size=7)
H, TOL, COORDS, N = 1e-5, 1e-7, 8, 2


def _params(config, prefix, seed=0):
    """The float64 parameters under prefix, GroupNorm scales/shifts moved off 1/0."""
    p = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    return {k: v + 0.2 * rng.standard_normal(v.shape) if v.ndim == 1 and "norm" in k else v
            for k, v in p.items() if k.startswith(prefix)}


def _arrays(seed=1, **shapes):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def _args(config, context=None):
    """The blocks' shared settings, with the prompt context (N, S, Cd) or None; token 2 of sample 1 is padding."""
    mask = None
    if context is not None:
        mask = np.ones(context.shape[:2], bool)
        mask[1, 2] = False
    return BlockArgs(config.norm_num_groups, config.norm_eps, context=context, context_mask=mask)


def _check_block(forward, backward, params, arrays):
    """forward(params, **arrays) -> (outputs, cache); backward(douts, cache, grads) -> {array name: gradient},
    writing the parameter gradients into grads. Every parameter and array against centered differences."""
    def loss_outputs(**inputs):
        outs, _ = forward({k: inputs[k] for k in params}, **{k: inputs[k] for k in arrays})
        return np.concatenate([o.reshape(-1) for o in outs])

    def analytic(g):
        outs, cache = forward(params, **arrays)
        sizes = np.cumsum([o.size for o in outs])[:-1]
        douts = [d.reshape(o.shape) for d, o in zip(np.split(g, sizes), outs)]
        before = snapshot((douts, cache))
        grads = {}
        dinputs = backward(douts, cache, grads)
        assert_same(snapshot((douts, cache)), before)  # the backward mutated neither dy nor its cache
        assert grads.keys() == params.keys() and dinputs.keys() == arrays.keys()
        return {**grads, **dinputs}

    return check_grads(loss_outputs, {**params, **arrays}, analytic, h=H, max_coords=COORDS, tol=TOL)


# ----------------------------------------------------------------------------- resnet


@pytest.mark.parametrize("prefix, scale, dropout", [
    ("down_blocks.0.resnets.0.", 1.0, 0.0),  # 8 -> 8: identity shortcut
    ("down_blocks.1.resnets.0.", 1.0, 0.0),  # 8 -> 16: conv_shortcut (1x1)
    ("down_blocks.1.resnets.0.", 2.0, 0.0),  # output_scale_factor != 1 (the mid block's)
    ("down_blocks.0.resnets.0.", 1.5, 0.3),  # dropout on, a fixed mask
])
def test_resnet_block_gradcheck(prefix, scale, dropout):
    params = _params(TINY, prefix)
    c_in = params[prefix + "conv1.weight"].shape[1]
    c_out = params[prefix + "conv1.weight"].shape[0]
    arrays = _arrays(x=(N, c_in, 4, 4), temb=(N, TINY.temb_dim))
    masks = {prefix: dropout_mask(11, (N, c_out, 4, 4), dropout)} if dropout else None
    args = BlockArgs(TINY.norm_num_groups, TINY.norm_eps, dropout, train=dropout > 0, masks=masks)
    assert (prefix + "conv_shortcut.weight" in params) == (c_in != c_out)

    def forward(p, x, temb):
        y, cache = resnet_block_forward(p, prefix, x, temb, args, scale)
        return [y], cache

    def backward(douts, cache, grads):
        dx, dtemb = resnet_block_backward(douts[0], cache, grads)
        return dict(x=dx, temb=dtemb)

    _check_block(forward, backward, params, arrays)


# ----------------------------------------------------------------------------- down, mid, up


@pytest.mark.parametrize("config, index, padding", [
    (TINY, 0, 1),  # DownBlock2D with its stride-2 downsampler, padding 1
    (TINY, 0, 0),  # padding 0: pad right/bottom, then the conv (DDPM's)
    (TINY, 1, 1),  # AttnDownBlock2D (the last level: no downsampler)
    (CROSS, 1, 1),  # AttnDownBlock2D with cross-attention to a prompt
])
def test_down_block_gradcheck(config, index, padding):
    prefix = f"down_blocks.{index}."
    params = _params(config, prefix)
    c_in = params[prefix + "resnets.0.conv1.weight"].shape[1]
    heads = config.heads(config.block_out_channels[index]) if index == 1 else None
    add_downsample = index < len(config.block_out_channels) - 1
    shapes = dict(x=(N, c_in, 4, 4), temb=(N, config.temb_dim))
    if config.cross_attention_dim:
        shapes["context"] = (N, 3, config.cross_attention_dim)
    arrays = _arrays(**shapes)

    def forward(p, x, temb, context=None):
        args = _args(config, context)
        h, skips, cache = down_block_forward(p, prefix, x, temb, config.layers_per_block, heads, add_downsample,
                                             padding, args)
        return [h, *skips], cache

    def backward(douts, cache, grads):
        dx, dtemb, dctx = down_block_backward(douts[0], douts[1:], cache, grads)
        assert (dctx is None) == ("context" not in arrays)
        return dict(x=dx, temb=dtemb, **({"context": dctx} if dctx is not None else {}))

    _check_block(forward, backward, params, arrays)


@pytest.mark.parametrize("config, scale", [
    (TINY, 1.0),  # resnet -> attention -> resnet
    (dataclasses.replace(TINY, add_attention=False), 2.0),  # resnet -> resnet, mid_block_scale_factor 2
    (CROSS, 1.0),  # the mid attention also reads the prompt
])
def test_mid_block_gradcheck(config, scale):
    params = _params(config, "mid_block.")
    c = config.block_out_channels[-1]
    heads = config.heads(c) if config.add_attention else None
    shapes = dict(x=(N, c, 4, 4), temb=(N, config.temb_dim))
    if config.cross_attention_dim:
        shapes["context"] = (N, 3, config.cross_attention_dim)
    arrays = _arrays(**shapes)

    def forward(p, x, temb, context=None):
        args = _args(config, context)
        h, cache = mid_block_forward(p, "mid_block.", x, temb, heads, scale, args)
        return [h], cache

    def backward(douts, cache, grads):
        dx, dtemb, dctx = mid_block_backward(douts[0], cache, grads)
        return dict(x=dx, temb=dtemb, **({"context": dctx} if dctx is not None else {}))

    _check_block(forward, backward, params, arrays)


@pytest.mark.parametrize("config, index", [
    (TINY, 0),  # AttnUpBlock2D with its upsampler (nearest 2x, then a conv)
    (TINY, 1),  # UpBlock2D, the last level: no upsampler
    (CROSS, 0),  # AttnUpBlock2D with cross-attention
])
def test_up_block_gradcheck(config, index):
    prefix = f"up_blocks.{index}."
    params = _params(config, prefix)
    layers = config.layers_per_block + 1
    c_out = params[prefix + "resnets.0.conv1.weight"].shape[0]
    c_prev = config.block_out_channels[::-1][max(index - 1, 0)]
    # resnet i reads concat(h, skips[-1 - i]): the skip's channels are conv1's inputs minus h's
    c_skips = [params[f"{prefix}resnets.{i}.conv1.weight"].shape[1] - (c_prev if i == 0 else c_out)
               for i in range(layers)]
    heads = config.heads(c_out) if config.up_block_types[index] == "AttnUpBlock2D" else None
    add_upsample = index < len(config.block_out_channels) - 1
    shapes = dict(x=(N, c_prev, 4, 4), temb=(N, config.temb_dim))
    shapes.update({f"skip{j}": (N, c_skips[layers - 1 - j], 4, 4) for j in range(layers)})  # skips[j]
    if config.cross_attention_dim:
        shapes["context"] = (N, 3, config.cross_attention_dim)
    arrays = _arrays(**shapes)
    names = [f"skip{j}" for j in range(layers)]

    def forward(p, x, temb, context=None, **skips):
        args = _args(config, context)
        h, cache = up_block_forward(p, prefix, x, [skips[n] for n in names], temb, heads, add_upsample, args)
        return [h], cache

    def backward(douts, cache, grads):
        dx, dskips, dtemb, dctx = up_block_backward(douts[0], cache, grads)
        assert len(dskips) == layers
        return dict(x=dx, temb=dtemb, **dict(zip(names, dskips)), **({"context": dctx} if dctx is not None else {}))

    _check_block(forward, backward, params, arrays)


def test_down_block_skips_without_gradient():
    """dskips None (the classifier drops the skips) == zero skip gradients."""
    prefix = "down_blocks.0."
    params, arrays = _params(TINY, prefix), _arrays(x=(N, 8, 4, 4), temb=(N, TINY.temb_dim))
    args = _args(TINY)
    h, skips, cache = down_block_forward(params, prefix, arrays["x"], arrays["temb"], 1, None, True, 1, args)
    dh = np.random.default_rng(4).standard_normal(h.shape)
    g_none, g_zero = {}, {}
    dx_none, dtemb_none, _ = down_block_backward(dh, [None] * len(skips), cache, g_none)
    dx_zero, dtemb_zero, _ = down_block_backward(dh, [np.zeros_like(s) for s in skips], cache, g_zero)
    np.testing.assert_array_equal(dx_none, dx_zero)
    np.testing.assert_array_equal(dtemb_none, dtemb_zero)
    for k in g_zero:
        np.testing.assert_array_equal(g_none[k], g_zero[k])
