"""Resampling ops of the UNet: nearest 2x upsampling, strided-conv downsampling, 2x2 average pooling.

Shape legend: N batch, C channels (C_in / C_out around the conv), H W input size,
Ho = H // 2, Wo = W // 2 pooled size.

These match diffusers' Upsample2D (F.interpolate(scale_factor=2, mode="nearest")) and
Downsample2D (a 3x3 stride-2 conv, or AvgPool2d(2, 2) when use_conv=False).
"""

from __future__ import annotations

from ..backend import get_array_module
from ._check import check_float, check_ndim, check_shape
from .conv2d import _check_int, conv2d_backward, conv2d_forward


def upsample_nearest2x_forward(x):
    """y[n, c, h, w] = x[n, c, h // 2, w // 2]   (F.interpolate(x, scale_factor=2, mode="nearest"))

    Inputs:  x (N, C, H, W) float.
    Returns: y (N, C, 2H, 2W), and the cache (x's shape) for upsample_nearest2x_backward.
    """
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    y = x.repeat(2, axis=2).repeat(2, axis=3)  # (N, C, 2H, 2W)
    cache = (
        tuple(x.shape),  # (N, C, H, W): the gradient needs only the shape, so the array is not kept
    )
    return y, cache


def upsample_nearest2x_backward(dy, cache):
    """dx[n, c, h, w] = sum_{a, b in {0, 1}} dy[n, c, 2h + a, 2w + b]

    Inputs:  dy (N, C, 2H, 2W); cache from upsample_nearest2x_forward.
    Returns: dx (N, C, H, W).
    """
    (N, C, H, W), = cache
    check_shape("dy", dy, (N, C, 2 * H, 2 * W), "(N, C, 2H, 2W)")
    # forward: y = x.repeat(2, axis=2).repeat(2, axis=3)   (each x pixel copied to a 2x2 block)
    # summed as two strided adds: ~15x faster in NumPy than .reshape(N, C, H, 2, W, 2).sum(axis=(3, 5))
    rows = dy[:, :, 0::2] + dy[:, :, 1::2]  # (N, C, H, 2W) the block's two rows
    return rows[..., 0::2] + rows[..., 1::2]  # (N, C, H, W) and its two columns


def downsample_forward(x, w, b, padding=1):
    """y = conv2d(x, w, b, stride=2, padding)   (diffusers Downsample2D with use_conv=True)

    padding = p > 0 pads p zeros on every side (p = 1 is the default: Ho = ceil(H / 2));
    padding = 0 is diffusers' variant: F.pad(x, (0, 1, 0, 1)), i.e. one zero row at the bottom
    and one zero column at the right, then a conv with no padding.

    Inputs:  x (N, C_in, H, W), w (C_out, C_in, 3, 3), b (C_out,) or None; padding int >= 0.
    Returns: y (N, C_out, Ho, Wo), and the cache for downsample_backward.
    """
    p = _check_int("padding", padding, 0)
    pads = (0, 1, 0, 1) if p == 0 else p  # (top, bottom, left, right) for the diffusers variant
    y, conv_cache = conv2d_forward(x, w, b, stride=2, padding=pads)
    cache = conv_cache  # the conv's own cache: it records the padding actually applied
    return y, cache


def downsample_backward(dy, cache):
    """The backward of the stride-2 conv (conv2d_backward); the padding is sliced off there.

    Inputs:  dy (N, C_out, Ho, Wo); cache from downsample_forward.
    Returns: dx (N, C_in, H, W), dw (C_out, C_in, 3, 3), db (C_out,) or None.
    """
    # forward: y, conv_cache = conv2d_forward(x, w, b, stride=2, padding=pads)
    return conv2d_backward(dy, cache)


def avgpool2x2_forward(x):
    """y[n, c, h, w] = 1/4 sum_{a, b in {0, 1}} x[n, c, 2h + a, 2w + b]   (F.avg_pool2d(x, 2, 2))

    An odd last row/column is dropped, as PyTorch does (floor mode).

    Inputs:  x (N, C, H, W) float with H, W >= 2.
    Returns: y (N, C, H // 2, W // 2), and the cache for avgpool2x2_backward.
    """
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    N, C, H, W = x.shape
    if H < 2 or W < 2:
        raise ValueError(f"x must have H, W >= 2 for 2x2 average pooling, got shape {tuple(x.shape)}")
    Ho, Wo = H // 2, W // 2
    blocks = x[:, :, :2 * Ho, :2 * Wo].reshape(N, C, Ho, 2, Wo, 2)  # (N, C, Ho, 2, Wo, 2)
    y = blocks.mean(axis=(3, 5))  # (N, C, Ho, Wo)
    cache = (
        tuple(x.shape),  # (N, C, H, W): the gradient needs only the shape (and dtype via dy)
    )
    return y, cache


def avgpool2x2_backward(dy, cache):
    """dx[n, c, 2h + a, 2w + b] = dy[n, c, h, w] / 4 for a, b in {0, 1}; 0 on a dropped odd row/column.

    Inputs:  dy (N, C, H // 2, W // 2); cache from avgpool2x2_forward.
    Returns: dx (N, C, H, W).
    """
    (N, C, H, W), = cache
    Ho, Wo = H // 2, W // 2
    check_shape("dy", dy, (N, C, Ho, Wo), "(N, C, H // 2, W // 2)")
    xp = get_array_module(dy)
    dx = xp.zeros((N, C, H, W), dtype=dy.dtype)
    # forward: y = x[:, :, :2 * Ho, :2 * Wo].reshape(N, C, Ho, 2, Wo, 2).mean(axis=(3, 5))
    quarter = dy * dy.dtype.type(0.25)  # (N, C, Ho, Wo)
    dx[:, :, :2 * Ho, :2 * Wo] = quarter.repeat(2, axis=2).repeat(2, axis=3)
    return dx  # (N, C, H, W)
