"""The dropout masks of one U-Net call, chosen before the call and passed in.

    mask[prefix] ~ Bernoulli(1 - p) of shape (N, C_out, H_i, W_i), one per resnet block, in forward order

Choosing them up front keeps the model free of random state: the caller (the Trainer) owns the
generator. Each mask is its own SplitMix64 stream (nn/dropout.py), keyed by one seed that the host
generator draws per resnet in forward order, so a mask is a function of (seed, shape): the same on
NumPy and CuPy. DropoutMasks holds the seeds and draws each mask when its block reads it; a caller
that splits the batch (fast/cpu/shards.py, training/accumulate.py) passes each piece take_rows(start,
stop), which draws only those rows of the same masks (and travels to a worker process as a few numbers).

Shape legend: N batch, C_out a resnet's output channels, H_i W_i its spatial size, n = stop - start rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from ..backend import xp_for
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


@dataclass(frozen=True, eq=False)
class DropoutMasks(Mapping):
    """{resnet prefix: keep-mask (n, C_out, H_i, W_i) bool}: rows[0]:rows[1] of the whole batch's mask
    dropout_mask(seeds[prefix], shapes[prefix], p), drawn on `device` each time a prefix is read."""

    seeds: dict  # {prefix: int} one SplitMix64 key per resnet
    shapes: dict  # {prefix: (N, C_out, H_i, W_i)} the whole batch's mask shapes
    p: float  # the drop probability
    rows: tuple  # (start, stop): the rows of the batch these masks are
    device: str = "cpu"  # 'cpu' (NumPy) or 'gpu' (CuPy)

    def __getitem__(self, prefix: str):
        return dropout_mask(self.seeds[prefix], self.shapes[prefix], self.p, rows=self.rows, xp=xp_for(self.device))

    def __iter__(self):
        return iter(self.seeds)

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def num_rows(self) -> int:
        return self.rows[1] - self.rows[0]

    def take_rows(self, start: int, stop: int) -> "DropoutMasks":
        """Rows start:stop of these masks (as batch[start:stop] of their n rows), still undrawn."""
        start, stop, _ = slice(start, stop).indices(self.num_rows)
        return replace(self, rows=(self.rows[0] + start, self.rows[0] + max(start, stop)))


def draw_dropout_masks(config, rng, x_shape, xp=np, encoder_only: bool = False) -> DropoutMasks:
    """The keep-masks {resnet prefix: (N, C_out, H_i, W_i) bool on xp}, P(keep) = 1 - config.dropout.

    rng: the host np.random.Generator; one seed per resnet, drawn here in forward order (each mask
    itself is drawn when its block reads it)."""
    shapes = resnet_shapes(config, x_shape, encoder_only)
    seeds = {prefix: int(rng.integers(2**63 - 1)) for prefix in shapes}
    return DropoutMasks(seeds, shapes, float(config.dropout), (0, int(x_shape[0])), "cpu" if xp is np else "gpu")


def as_rng(rng) -> np.random.Generator:
    """The host generator that draws the masks: rng itself, or np.random.default_rng(rng) for None or an int seed."""
    if rng is None or isinstance(rng, (int, np.integer)):
        return np.random.default_rng(rng)
    if isinstance(rng, np.random.Generator):
        return rng
    raise ValueError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__}")
