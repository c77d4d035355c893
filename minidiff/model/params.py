"""The U-Net's parameters: names and shapes (UNet2DModel's state_dict, in its order), counts,
and PyTorch's default initialization (plus DDPM's optional zero-init of each residual branch).

Shape legend: C_in / C_out image channels, C block channels, T time-embedding width,
Cd cross_attention_dim, V vocabulary sizes (classes, prompt tokens).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .config import PRESETS, UNetConfig


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
