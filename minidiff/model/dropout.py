"""The dropout masks of one U-Net call, drawn before the call and passed in.

    mask[prefix] ~ Bernoulli(1 - p) of shape (N, C_out, H_i, W_i), one per resnet block, in forward order

Drawing them up front keeps the model free of random state: the caller (the Trainer) owns the
generator, and a caller that splits the batch (fast/cpu/shards.py) passes each piece its rows of
the same masks. Each mask comes from its own SplitMix64 stream (nn/dropout.py), keyed by one seed
that the host generator draws per resnet in forward order: the same masks on NumPy and CuPy.

Shape legend: N batch, C_out a resnet's output channels, H_i W_i its spatial size.
"""

from __future__ import annotations

import numpy as np

from ..nn.dropout import dropout_mask


def resnet_shapes(config, x_shape, encoder_only: bool = False) -> dict:
    """{resnet key prefix: its output shape (N, C_out, H_i, W_i)}, in the order unet_forward runs them.

    Down block i runs at H / 2^i with block_out_channels[i]; the mid block at the bottom; up block i
    at H / 2^(n-1-i) with the channels reversed. encoder_only: the down and mid blocks (the classifier).
    """
    N, _, H, W = x_shape
    ch, layers, n = config.block_out_channels, config.layers_per_block, len(config.block_out_channels)
    shapes = {}
    for i, c in enumerate(ch):
        for j in range(layers):
            shapes[f"down_blocks.{i}.resnets.{j}."] = (N, c, H >> i, W >> i)
    for j in range(2):
        shapes[f"mid_block.resnets.{j}."] = (N, ch[-1], H >> (n - 1), W >> (n - 1))
    if not encoder_only:
        for i, c in enumerate(ch[::-1]):
            for j in range(layers + 1):
                shapes[f"up_blocks.{i}.resnets.{j}."] = (N, c, H >> (n - 1 - i), W >> (n - 1 - i))
    return shapes


def draw_dropout_masks(config, rng, x_shape, xp=np, encoder_only: bool = False) -> dict:
    """{resnet key prefix: keep-mask (N, C_out, H_i, W_i) bool on xp}, P(keep) = 1 - config.dropout.

    rng: the host np.random.Generator; one seed per resnet, drawn in forward order."""
    return {prefix: dropout_mask(int(rng.integers(2**63 - 1)), shape, config.dropout, xp=xp)
            for prefix, shape in resnet_shapes(config, x_shape, encoder_only).items()}


def as_rng(rng) -> np.random.Generator:
    """The host generator that draws the masks: rng itself, or np.random.default_rng(rng) for None or an int seed."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__}")
