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
order of its state_dict (param_shapes). Gradients come back under exactly the same keys.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .backend import get_array_module, to_numpy
from .blocks import (
    BlockArgs,
    down_block_backward,
    down_block_forward,
    mid_block_backward,
    mid_block_forward,
    up_block_backward,
    up_block_forward,
)
from .nn import (
    conv2d_backward,
    conv2d_forward,
    embedding_backward,
    embedding_forward,
    groupnorm_backward,
    groupnorm_forward,
    linear_backward,
    linear_forward,
    silu_backward,
    silu_forward,
    timestep_embedding,
)
from .nn._check import check_float, check_ndim, check_shape
from .unet_config import PRESETS, UNetConfig


def _resnet_shapes(prefix, cin, cout, temb_dim):
    s = {f"{prefix}norm1.weight": (cin,), f"{prefix}norm1.bias": (cin,),
         f"{prefix}conv1.weight": (cout, cin, 3, 3), f"{prefix}conv1.bias": (cout,),
         f"{prefix}time_emb_proj.weight": (cout, temb_dim), f"{prefix}time_emb_proj.bias": (cout,),
         f"{prefix}norm2.weight": (cout,), f"{prefix}norm2.bias": (cout,),
         f"{prefix}conv2.weight": (cout, cout, 3, 3), f"{prefix}conv2.bias": (cout,)}
    if cin != cout:  # diffusers' use_in_shortcut: a 1x1 conv matches the channels
        s.update({f"{prefix}conv_shortcut.weight": (cout, cin, 1, 1), f"{prefix}conv_shortcut.bias": (cout,)})
    return s


def _attention_shapes(prefix, c, cross_dim):
    names = ["to_q", "to_k", "to_v"] + (["add_k_proj", "add_v_proj"] if cross_dim else []) + ["to_out.0"]
    s = {f"{prefix}group_norm.weight": (c,), f"{prefix}group_norm.bias": (c,)}
    for name in names:
        s.update({f"{prefix}{name}.weight": (c, cross_dim if name.startswith("add_") else c),
                  f"{prefix}{name}.bias": (c,)})
    return s


@functools.lru_cache(maxsize=32)
def _shapes(config: UNetConfig) -> tuple:
    c, boc, T, n = config, config.block_out_channels, config.temb_dim, len(config.block_out_channels)
    s = {"conv_in.weight": (boc[0], c.in_channels, 3, 3), "conv_in.bias": (boc[0],),
         "time_embedding.linear_1.weight": (T, boc[0]), "time_embedding.linear_1.bias": (T,),
         "time_embedding.linear_2.weight": (T, T), "time_embedding.linear_2.bias": (T,)}
    if c.num_class_embeds is not None:
        s["class_embedding.weight"] = (c.num_class_embeds, T)
    if c.cross_attention_dim is not None:
        s["context_embedding.weight"] = (c.context_vocab_size, c.cross_attention_dim)
    cd = c.cross_attention_dim
    for i, kind in enumerate(c.down_block_types):  # AttnDownBlock2D registers attentions first
        cin, cout, p = boc[max(i - 1, 0)], boc[i], f"down_blocks.{i}."
        if kind == "AttnDownBlock2D":
            for j in range(c.layers_per_block):
                s.update(_attention_shapes(f"{p}attentions.{j}.", cout, cd))
        for j in range(c.layers_per_block):
            s.update(_resnet_shapes(f"{p}resnets.{j}.", cin if j == 0 else cout, cout, T))
        if i < n - 1:
            s.update({f"{p}downsamplers.0.conv.weight": (cout, cout, 3, 3), f"{p}downsamplers.0.conv.bias": (cout,)})
    rev = boc[::-1]
    for i, kind in enumerate(c.up_block_types):
        prev, cout, cskip, p = rev[max(i - 1, 0)], rev[i], rev[min(i + 1, n - 1)], f"up_blocks.{i}."
        last = c.layers_per_block  # up blocks have layers_per_block + 1 resnets
        if kind == "AttnUpBlock2D":
            for j in range(last + 1):
                s.update(_attention_shapes(f"{p}attentions.{j}.", cout, cd))
        for j in range(last + 1):
            cin = (prev if j == 0 else cout) + (cskip if j == last else cout)
            s.update(_resnet_shapes(f"{p}resnets.{j}.", cin, cout, T))
        if i < n - 1:
            s.update({f"{p}upsamplers.0.conv.weight": (cout, cout, 3, 3), f"{p}upsamplers.0.conv.bias": (cout,)})
    # mid_block comes after up_blocks in UNet2DModel's state_dict (its attribute is registered later)
    if c.add_attention:
        s.update(_attention_shapes("mid_block.attentions.0.", boc[-1], cd))
    for j in range(2):
        s.update(_resnet_shapes(f"mid_block.resnets.{j}.", boc[-1], boc[-1], T))
    s.update({"conv_norm_out.weight": (boc[0],), "conv_norm_out.bias": (boc[0],),
              "conv_out.weight": (c.out_channels, boc[0], 3, 3), "conv_out.bias": (c.out_channels,)})
    return tuple(s.items())


def param_shapes(config: UNetConfig) -> dict:
    """{state-dict key: shape}, in the order of UNet2DModel's state_dict()."""
    if not isinstance(config, UNetConfig):
        raise ValueError(f"config must be a UNetConfig, got {type(config).__name__}")
    return dict(_shapes(config))


def count_params(config_or_params) -> int:
    """Number of scalar parameters of a UNetConfig (from the shapes) or of a params dict."""
    if isinstance(config_or_params, dict):
        return int(sum(int(np.prod(v.shape)) for v in config_or_params.values()))
    return int(sum(math.prod(shape) for shape in param_shapes(config_or_params).values()))


def print_param_counts(file=None) -> None:
    """Print each preset's parameter count (`minidiff info`)."""
    for name, config in PRESETS.items():
        print(f"{name:14s} {count_params(config):>12,d} parameters", file=file)


def _zeroed_by_ddpm(key: str) -> bool:
    """DDPM's init_scale=0 layers: each resnet's conv2, each attention's proj_out, and conv_out."""
    return key.split(".")[-2] in ("conv2", "conv_out") or ".to_out.0." in key


def init_params(config: UNetConfig, seed=0, dtype=np.float32, zero_init_last=False) -> dict:
    """PyTorch's default initialization, drawn on the host with np.random.default_rng(seed) in
    param_shapes order (so NumPy and CuPy runs start from the same weights; move them with to_device):

        conv / linear weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))   (kaiming_uniform(a=sqrt(5)))
        GroupNorm weight = 1, bias = 0;   nn.Embedding weight ~ N(0, 1)
    zero_init_last: afterwards zero (weight and bias) each resnet's conv2, each attention's to_out.0
    and conv_out, as DDPM's init_scale=0 does (each residual branch starts as the identity).
    Returns: {key: np.ndarray of dtype}, in param_shapes order.
    """
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)
    params = {}
    for key, shape in shapes.items():
        if key in ("class_embedding.weight", "context_embedding.weight"):
            w = rng.standard_normal(shape)  # nn.Embedding
        elif len(shapes[key.rsplit(".", 1)[0] + ".weight"]) == 1:  # GroupNorm: 1-d weight
            w = np.ones(shape) if key.endswith(".weight") else np.zeros(shape)
        else:
            fan_in = math.prod(shapes[key.rsplit(".", 1)[0] + ".weight"][1:])
            bound = 1.0 / math.sqrt(fan_in)
            w = rng.uniform(-bound, bound, shape)
        params[key] = w.astype(dt)
    if zero_init_last:
        for key in params:
            if _zeroed_by_ddpm(key):
                params[key] = np.zeros_like(params[key])
    return params


def _check_params(params, config, x) -> None:
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
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__}")


def unet_forward(params, config, x, t, class_labels=None, context=None, train=False, rng=None):
    """eps = UNet(x_t, t[, y][, prompt])   (UNet2DModel.forward, op for op)

    Inputs:  params from init_params (or load_pretrained), config its UNetConfig;
             x (N, C_in, H, W) float32/float64, H and W multiples of 2**(len(block_out_channels)-1);
             t int or float, a scalar or (N,); class_labels (N,) ints in [0, num_class_embeds)
             (required iff num_class_embeds is set); context (N, S) int token ids in
             [0, context_vocab_size), id 0 = padding (None = empty prompt; cross-attention configs only);
             train: dropout on; rng: None, an int seed or a np.random.Generator for the dropout masks.
    Returns: eps (N, C_out, H, W), and the cache for unet_backward (an independent object per call).
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
    t = xp.asarray(to_numpy(t) if xp is np else t)
    t = xp.broadcast_to(t, (N,)) if t.ndim == 0 else t
    check_shape("t", t, (N,), "(N,) or a scalar")
    if (class_labels is None) != (c.num_class_embeds is None):
        raise ValueError("class_labels must be given exactly when config.num_class_embeds is set "
                         f"(num_class_embeds={c.num_class_embeds}, class_labels {'None' if class_labels is None else 'given'})")
    if context is not None and c.cross_attention_dim is None:
        raise ValueError("context must be None: config.cross_attention_dim is None (no cross-attention)")
    args = BlockArgs(c.norm_num_groups, c.norm_eps, c.dropout, train,
                     _as_rng(rng) if train and c.dropout > 0 else None)
    p = params

    # 1. time (and class) embedding -> temb (N, T)
    t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift, dtype=x.dtype)
    e, lin1 = linear_forward(t_emb, p["time_embedding.linear_1.weight"], p["time_embedding.linear_1.bias"])
    e, act = silu_forward(e)  # (N, T)
    temb, lin2 = linear_forward(e, p["time_embedding.linear_2.weight"], p["time_embedding.linear_2.bias"])
    cls = None
    if class_labels is not None:
        check_shape("class_labels", class_labels, (N,), "(N,)")
        y_emb, cls = embedding_forward(xp.asarray(class_labels), p["class_embedding.weight"])  # (N, T)
        temb = temb + y_emb  # (N, T)
    ctx = None
    if c.cross_attention_dim is not None:
        ids = xp.zeros((N, 1), dtype=np.int64) if context is None else xp.asarray(context)  # empty: 1 pad
        check_ndim("context", ids, 2, "(N, S)")
        check_shape("context", ids, (N, ids.shape[1]), "(N, S)")
        args.context, ctx = embedding_forward(ids, p["context_embedding.weight"])  # (N, S, Cd)
        args.context_mask = ids != 0  # (N, S) padding (id 0) is never attended to
    # 2. conv_in
    h, conv_in = conv2d_forward(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)  # (N, C0, H, W)
    skips = [h]
    # 3. down
    downs = []
    for i, kind in enumerate(c.down_block_types):
        heads = c.heads(c.block_out_channels[i]) if kind == "AttnDownBlock2D" else None
        h, block_skips, dc = down_block_forward(p, f"down_blocks.{i}.", h, temb, c.layers_per_block, heads,
                                                i < n - 1, c.downsample_padding, args)
        skips += block_skips
        downs.append((dc, len(block_skips)))
    # 4. mid
    heads = c.heads(c.block_out_channels[-1]) if c.add_attention else None
    h, mid = mid_block_forward(p, "mid_block.", h, temb, heads, c.mid_block_scale_factor, args)
    # 5. up
    ups = []
    for i, kind in enumerate(c.up_block_types):
        heads = c.heads(c.block_out_channels[::-1][i]) if kind == "AttnUpBlock2D" else None
        block_skips, skips = skips[-(c.layers_per_block + 1):], skips[:-(c.layers_per_block + 1)]
        h, uc = up_block_forward(p, f"up_blocks.{i}.", h, block_skips, temb, heads, i < n - 1, args)
        ups.append(uc)
    # 6. out
    h, norm_out = groupnorm_forward(h, p["conv_norm_out.weight"], p["conv_norm_out.bias"], c.norm_num_groups,
                                    c.norm_eps)
    h, act_out = silu_forward(h)
    eps, conv_out = conv2d_forward(h, p["conv_out.weight"], p["conv_out.bias"], padding=1)  # (N, C_out, H, W)
    cache = dict(
        keys=tuple(p),  # the params' keys, to return grads in the same order
        lin1=lin1, act=act, lin2=lin2,  # time-embedding MLP caches
        cls=cls,  # class-embedding lookup cache, or None
        ctx=ctx,  # prompt-token lookup cache, or None without cross-attention
        conv_in=conv_in,  # caches of the stem
        downs=downs,  # per down block: (block cache, how many skips it pushed)
        mid=mid,  # mid-block cache
        ups=ups,  # per up block: its cache
        norm_out=norm_out, act_out=act_out, conv_out=conv_out,  # caches of the output head
    )
    return eps, cache


def unet_backward(deps, cache):
    """Gradients of L with dL/deps = deps through unet_forward, in reverse (6 -> 1).

    Inputs:  deps (N, C_out, H, W) the upstream gradient; cache from unet_forward.
    Returns: grads {key: array} with exactly params' keys (same order), dx (N, C_in, H, W).
    """
    check_float("deps", deps)
    g, k = {}, cache
    # 6. out -- forward: eps = conv_out(silu(conv_norm_out(h)))
    dh, g["conv_out.weight"], g["conv_out.bias"] = conv2d_backward(deps, k["conv_out"])
    dh = silu_backward(dh, k["act_out"])
    dh, g["conv_norm_out.weight"], g["conv_norm_out.bias"] = groupnorm_backward(dh, k["norm_out"])
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
    dx, g["conv_in.weight"], g["conv_in.bias"] = conv2d_backward(dh, k["conv_in"])
    # 1. embeddings -- forward: args.context = context_embedding[ids]
    if k["ctx"] is not None:
        g["context_embedding.weight"] = embedding_backward(dctx, k["ctx"])
    # forward: temb = temb + class_embedding[class_labels]
    if k["cls"] is not None:
        g["class_embedding.weight"] = embedding_backward(dtemb, k["cls"])
    # forward: temb = linear_2(silu(linear_1(t_emb)))   (t_emb has no parameters: its gradient is dropped)
    de, g["time_embedding.linear_2.weight"], g["time_embedding.linear_2.bias"] = linear_backward(dtemb, k["lin2"])
    de = silu_backward(de, k["act"])
    _, g["time_embedding.linear_1.weight"], g["time_embedding.linear_1.bias"] = linear_backward(de, k["lin1"])
    return {key: g[key] for key in k["keys"]}, dx
