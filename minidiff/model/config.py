"""The U-Net's configuration: diffusers' UNet2DModel field names and meanings, for the subset minidiff builds.

A `UNetConfig` describes the same network as `diffusers.UNet2DModel(**fields)` (the two share
parameter names, shapes and the order of operations), plus one option of minidiff's own:
cross-attention to a sequence of prompt tokens (`cross_attention_dim`, `context_vocab_size`).

Shape legend: none here; this module holds numbers that decide the shapes of unet.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

DOWN_BLOCK_TYPES = ("DownBlock2D", "AttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "AttnUpBlock2D")


@dataclass(frozen=True)
class UNetConfig:
    """UNet2DModel's options (same names, same meanings). The defaults are UNet2DModel's own,
    except sample_size (diffusers: None), so UNetConfig() describes UNet2DModel(sample_size=32)."""

    sample_size: int = 32  # height = width of the images; a multiple of 2**(len(block_out_channels) - 1)
    in_channels: int = 3  # channels of the noisy image x_t
    out_channels: int = 3  # channels of the prediction (eps, x_0 or v)
    block_out_channels: tuple = (224, 448, 672, 896)  # channels at each resolution, highest first
    layers_per_block: int = 2  # resnets per down block (up blocks have one more, for the extra skip)
    down_block_types: tuple = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    add_attention: bool = True  # self-attention between the two resnets of the mid block
    attention_head_dim: int | None = 8  # channels per head; heads = channels // head_dim; None: one head
    norm_num_groups: int = 32  # GroupNorm groups everywhere (resnets, attention, conv_norm_out)
    norm_eps: float = 1e-5  # GroupNorm epsilon everywhere
    flip_sin_to_cos: bool = True  # timestep embedding [cos, sin] (True) or [sin, cos] (False, DDPM's)
    freq_shift: float = 0  # frequencies exp(-ln(10000) i / (half - freq_shift)); DDPM's is 1
    downsample_padding: int = 1  # 1: conv padding 1; 0: pad (right 1, bottom 1) then conv (DDPM's)
    dropout: float = 0.0  # dropout probability inside each resnet, before conv2 (DDPM CIFAR-10: 0.1)
    mid_block_scale_factor: float = 1.0  # mid-block resnet and attention outputs are divided by this
    time_embedding_dim: int | None = None  # width of the time embedding; None: 4 * block_out_channels[0]
    num_class_embeds: int | None = None  # class conditioning: an nn.Embedding added to the time embedding
    time_embedding_type: str = "positional"  # only "positional" (sinusoidal) is supported
    center_input_sample: bool = False  # only False is supported (inputs are already in [-1, 1])
    # --- minidiff's own option (no UNet2DModel twin): text conditioning by cross-attention ---
    cross_attention_dim: int | None = None  # width of the prompt-token embeddings; None: off
    context_vocab_size: int | None = None  # rows of context_embedding.weight; token id 0 is padding

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        validate_config(self)

    @property
    def temb_dim(self) -> int:
        """Width of the time embedding (and of the class embedding added to it)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def heads(self, channels: int) -> int:
        """Attention heads at a given width: channels // attention_head_dim (None: 1 head)."""
        return 1 if self.attention_head_dim is None else channels // self.attention_head_dim

    def to_dict(self) -> dict:
        """A JSON-safe dict (tuples become lists); UNetConfig.from_dict inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        """Build from to_dict()'s output; an unknown key is a ValueError that names it."""
        if not isinstance(d, dict):
            raise ValueError(f"a UNetConfig is a JSON object of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in d:
            if key not in known:
                raise ValueError(f"unknown UNetConfig field {_short(key)}; known fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> UNetConfig:
        return cls.from_dict(json.loads(text))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# The largest value of each size field: far above any real model, low enough that a config read from a
# file (config.json, a checkpoint) cannot make minidiff build millions of layers before any weight is read.
LIMITS = dict(sample_size=4096, in_channels=65536, out_channels=65536, layers_per_block=64,
              norm_num_groups=65536, attention_head_dim=65536, time_embedding_dim=4 * 65536,
              num_class_embeds=1_000_000, cross_attention_dim=65536, context_vocab_size=1_000_000)
MAX_BLOCK_CHANNELS = 65536  # each block_out_channels entry
MAX_LEVELS = 13  # entries of block_out_channels: 12 halvings take sample_size 4096 to 1


def _check_size(name: str, v, optional: bool = False) -> None:
    if optional and v is None:
        return
    if not _is_int(v) or not 1 <= v <= LIMITS[name]:
        raise ValueError(f"{name} must be an int in 1..{LIMITS[name]:,}{' or None' if optional else ''} "
                         f"(minidiff's bound, config.LIMITS), got {_short(v)}")


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def validate_config(c: UNetConfig) -> None:
    """Raise ValueError naming the first field that makes the network impossible to build (or exceeds LIMITS)."""
    for name in ("sample_size", "in_channels", "out_channels", "layers_per_block", "norm_num_groups"):
        _check_size(name, getattr(c, name))
    boc = c.block_out_channels
    if not isinstance(boc, tuple) or not 1 <= len(boc) <= MAX_LEVELS or not all(
            _is_int(v) and 1 <= v <= MAX_BLOCK_CHANNELS for v in boc):
        raise ValueError(f"block_out_channels must be a list of 1..{MAX_LEVELS} ints in 1..{MAX_BLOCK_CHANNELS:,} "
                         f"(minidiff's bounds), got {_short(boc)}")
    n = len(boc)
    for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
        types = getattr(c, name)
        if not isinstance(types, tuple) or len(types) != n:
            raise ValueError(f"{name} must have one entry per block_out_channels entry ({n}), got {_short(types)}")
        for t in types:
            if t not in allowed:
                raise ValueError(f"{name} entry {_short(t)} is not supported; allowed: {allowed}")
    for ch in sorted(set(boc)):
        if ch % c.norm_num_groups:
            raise ValueError(f"norm_num_groups={c.norm_num_groups} must divide every block_out_channels "
                             f"entry, got {ch} in {boc}")
    if c.sample_size % 2 ** (n - 1):
        raise ValueError(f"sample_size={c.sample_size} must be a multiple of 2**(len(block_out_channels) - 1)"
                         f" = {2 ** (n - 1)} so that each of the {n - 1} downsamplings halves it exactly")
    for name in ("attention_head_dim", "time_embedding_dim", "num_class_embeds", "cross_attention_dim",
                 "context_vocab_size"):
        _check_size(name, getattr(c, name), optional=True)
    if c.attention_head_dim is not None:
        attn_channels = [ch for ch, t in zip(boc, c.down_block_types) if t.startswith("Attn")]
        attn_channels += [ch for ch, t in zip(boc[::-1], c.up_block_types) if t.startswith("Attn")]
        attn_channels += [boc[-1]] if c.add_attention else []
        for ch in attn_channels:
            if ch % c.attention_head_dim:
                raise ValueError(f"attention_head_dim={c.attention_head_dim} must divide the channels of "
                                 f"every attention block, got {ch}")
    if not isinstance(c.add_attention, bool):
        raise ValueError(f"add_attention must be a bool, got {_short(c.add_attention)}")
    if not isinstance(c.flip_sin_to_cos, bool):
        raise ValueError(f"flip_sin_to_cos must be a bool, got {_short(c.flip_sin_to_cos)}")
    for name in ("norm_eps", "freq_shift", "dropout", "mid_block_scale_factor"):
        v = getattr(c, name)
        if not _is_number(v) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {_short(v)}")
    if not c.norm_eps > 0:
        raise ValueError(f"norm_eps must be a positive number, got {c.norm_eps!r}")
    if not _is_number(c.freq_shift) or c.freq_shift == c.block_out_channels[0] // 2:
        raise ValueError(f"freq_shift must be a number other than block_out_channels[0] // 2 = "
                         f"{c.block_out_channels[0] // 2} (the frequencies divide by their difference), "
                         f"got {c.freq_shift!r}")
    if c.downsample_padding not in (0, 1) or isinstance(c.downsample_padding, bool):
        raise ValueError(f"downsample_padding must be 0 or 1, got {_short(c.downsample_padding)}")
    if not _is_number(c.dropout) or not 0 <= c.dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {c.dropout!r}")
    if not _is_number(c.mid_block_scale_factor) or c.mid_block_scale_factor == 0:
        raise ValueError(f"mid_block_scale_factor must be a nonzero number, got {c.mid_block_scale_factor!r}")
    if c.time_embedding_type != "positional":
        raise ValueError(f"time_embedding_type must be 'positional', got {_short(c.time_embedding_type)}")
    if c.center_input_sample is not False:
        raise ValueError(f"center_input_sample must be False, got {_short(c.center_input_sample)}")
    if (c.cross_attention_dim is None) != (c.context_vocab_size is None):
        raise ValueError("cross_attention_dim and context_vocab_size must be set together (text conditioning)"
                         f" or both be None, got {c.cross_attention_dim!r} and {c.context_vocab_size!r}")
    if c.cross_attention_dim is not None and c.context_vocab_size < 2:
        raise ValueError(f"context_vocab_size must be >= 2 (id 0 is padding), got {c.context_vocab_size}")
    if c.cross_attention_dim is not None and not c.add_attention and not any(
            t.startswith("Attn") for t in c.down_block_types + c.up_block_types):
        raise ValueError("cross_attention_dim needs at least one attention block (add_attention or an Attn* "
                         "block type)")


PRESETS = {
    # tests: 8x8 RGB, two resolutions, attention at the lower one (and in the mid block)
    "tiny": UNetConfig(
        sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=8, norm_num_groups=4, time_embedding_dim=32),
    # a laptop CPU: 32x32 RGB, three resolutions (32, 16, 8), attention at 8x8 only
    "small": UNetConfig(
        sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=32, norm_num_groups=8),
    # Ho et al. 2020, CIFAR-10 (google/ddpm-cifar10-32): 35,746,307 parameters
    "ddpm-cifar10": UNetConfig(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_num_groups=32, norm_eps=1e-6, flip_sin_to_cos=False, freq_shift=1,
        downsample_padding=0, dropout=0.1),
}


def get_preset(name: str) -> UNetConfig:
    """The named preset config ('tiny', 'small', 'ddpm-cifar10')."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]


# UNet2DModel.__init__ defaults, for keys a diffusers config.json leaves out
_DIFFUSERS_DEFAULTS = dict(
    sample_size=None, in_channels=3, out_channels=3, center_input_sample=False, time_embedding_type="positional",
    time_embedding_dim=None, freq_shift=0, flip_sin_to_cos=True,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    mid_block_type="UNetMidBlock2D", up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(224, 448, 672, 896), layers_per_block=2, mid_block_scale_factor=1, downsample_padding=1,
    downsample_type="conv", upsample_type="conv", dropout=0.0, act_fn="silu", attention_head_dim=8,
    norm_num_groups=32, attn_norm_num_groups=None, norm_eps=1e-5, resnet_time_scale_shift="default",
    add_attention=True, class_embed_type=None, num_class_embeds=None, num_train_timesteps=None)
# diffusers fields minidiff accepts only with these values (any one of the listed)
_FIXED = dict(mid_block_type=("UNetMidBlock2D",), downsample_type=("conv",), upsample_type=("conv",),
              act_fn=("silu", "swish"), resnet_time_scale_shift=("default",), class_embed_type=(None,))
_IGNORED = ("num_train_timesteps",)  # used by UNet2DModel only with time_embedding_type="learned"


def from_diffusers_config(d: dict) -> UNetConfig:
    """UNetConfig from a UNet2DModel config dict (config.json); unsupported fields -> ValueError naming them."""
    if d.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"_class_name must be 'UNet2DModel', got {_short(d['_class_name'])}")
    full = dict(_DIFFUSERS_DEFAULTS)
    for key, value in d.items():
        if key.startswith("_"):
            continue  # _class_name, _diffusers_version, _name_or_path, _use_default_values
        if key not in _DIFFUSERS_DEFAULTS:
            raise ValueError(f"UNet2DModel config field {_short(key)} is not supported by minidiff")
        full[key] = value
    for key, allowed in _FIXED.items():
        if full.pop(key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed} in minidiff, got {_short(d[key])}")
    for key in _IGNORED:
        full.pop(key)
    attn_groups = full.pop("attn_norm_num_groups")
    if attn_groups not in (None, full["norm_num_groups"]):
        raise ValueError(f"attn_norm_num_groups must be None or norm_num_groups, got {_short(attn_groups)}")
    if isinstance(full["sample_size"], (list, tuple)):
        raise ValueError(f"sample_size must be one int (square images), got {_short(full['sample_size'])}")
    if full["sample_size"] is None:
        raise ValueError("sample_size must be set (an int), got None")
    return UNetConfig(**full)


def to_diffusers_config(c: UNetConfig) -> dict:
    """The UNet2DModel config dict (config.json) of a config; cross-attention has no diffusers twin."""
    if c.cross_attention_dim is not None:
        raise ValueError("cross_attention_dim must be None to export to diffusers' UNet2DModel "
                         "(its attention blocks have no added key/value projections)")
    d = {k: v for k, v in c.to_dict().items() if k not in ("cross_attention_dim", "context_vocab_size")}
    d.update(_class_name="UNet2DModel", mid_block_type="UNetMidBlock2D", downsample_type="conv",
             upsample_type="conv", act_fn="silu", attn_norm_num_groups=None, resnet_time_scale_shift="default",
             class_embed_type=None, num_train_timesteps=None)
    return d

