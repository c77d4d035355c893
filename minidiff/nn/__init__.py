"""Stateless layer ops, each a forward/backward pair of free functions.

    y, cache = <op>_forward(x, params..., options...)
    grads    = <op>_backward(dy, cache)          # fresh arrays; dy and cache are never mutated

Layouts are PyTorch's: NCHW images, conv weight (C_out, C_in, kh, kw), linear weight (out, in).
"""

from .activations import silu_backward, silu_forward
from .attention import mha_backward, mha_forward, sdpa_backward, sdpa_forward
from .conv2d import conv2d_backward, conv2d_forward
from .cross_entropy import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from .dropout import dropout_backward, dropout_forward, dropout_mask
from .embedding import (
    embedding_backward,
    embedding_forward,
    timestep_embedding,
    timestep_embedding_backward,
    timestep_embedding_forward,
)
from .groupnorm import groupnorm_backward, groupnorm_forward
from .groupnorm_silu import groupnorm_silu_backward, groupnorm_silu_forward
from .linear import linear_backward, linear_forward
from .mse import mse_backward, mse_forward
from .resample import (
    avgpool2x2_backward,
    avgpool2x2_forward,
    downsample_backward,
    downsample_forward,
    upsample_nearest2x_backward,
    upsample_nearest2x_forward,
)

__all__ = [name for name in dir() if name.endswith(("_forward", "_backward")) or name == "timestep_embedding"]
