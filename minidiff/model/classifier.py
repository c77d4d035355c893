"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4.1):
the U-Net's encoder walk (encoder.py, shared with unet.py) with a pooled linear head, its hand-written
backward, and grad_x log p(y | x_t). Training, and the loader that turns a checkpoint into the grad_fn
that sampling uses, are in training/classifier.py.

    temb   = linear_2(silu(linear_1(sinusoid(t))))                   the U-Net's time embedding
    h      = mid_block(down_blocks(conv_in(x_t), temb), temb)         the U-Net's encoder (skips unused)
    logits = head.linear(mean_hw(silu(head.norm(h))))                 GroupNorm, SiLU, global mean pool
    grad_x log p(y | x_t) = d/dx sum_n log_softmax(logits)[n, y_n]    what guidance needs (Alg. 1 and 2)
    training: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1};  L = cross_entropy(logits, y)

Parameters: the U-Net's state-dict names and initial values for the shared parts (time_embedding.*,
conv_in.*, down_blocks.*, mid_block.*), plus head.norm.weight / head.norm.bias (Cl,) and
head.linear.weight (K, Cl) / head.linear.bias (K,): guided-diffusion's EncoderUNetModel head with
pool="adaptive" (normalization, SiLU, average pool, 1x1 conv = linear), here with PyTorch's default init.

Shape legend: N batch, C image channels, H W image side, T time-embedding width,
Cl = block_out_channels[-1], h w the side after the down path (H / 2**(levels - 1)), K classes.
"""

from __future__ import annotations

import math

import numpy as np

from ..backend import get_array_module
from .blocks import BlockArgs
from ..nn.cross_entropy import softmax_cross_entropy_backward, softmax_cross_entropy_forward
from ..nn._check import check_float
from ..nn.ops import REFERENCE
from .config import UNetConfig
from .dropout import as_rng, draw_dropout_masks
from .encoder import check_input, encoder_backward, encoder_forward
from .params import init_params, param_shapes

SHARED = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")  # key prefixes taken from the U-Net


def _check_classifier(config, num_classes) -> None:
    """ValueError unless config is an unconditional UNetConfig and num_classes an int >= 2."""
    if not isinstance(config, UNetConfig) or config.num_class_embeds or config.cross_attention_dim:
        raise ValueError("config must be an unconditional UNetConfig (no num_class_embeds, no cross_attention_dim)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


def classifier_param_shapes(config: UNetConfig, num_classes: int) -> dict:
    """{key: shape}: the U-Net's time embedding, conv_in, down and mid blocks, then the head."""
    _check_classifier(config, num_classes)
    s = {k: v for k, v in param_shapes(config).items() if k.startswith(SHARED)}
    cl = config.block_out_channels[-1]
    s.update({"head.norm.weight": (cl,), "head.norm.bias": (cl,),
              "head.linear.weight": (int(num_classes), cl), "head.linear.bias": (int(num_classes),)})
    return s


def classifier_init_params(config: UNetConfig, num_classes: int, seed: int = 0, dtype=np.float32) -> dict:
    """The U-Net's init_params(config, seed) for the shared keys; head: GroupNorm 1 / 0 and nn.Linear's
    U(-1/sqrt(Cl), 1/sqrt(Cl)) drawn from np.random.default_rng([seed, 1]). Host arrays of dtype."""
    shapes = classifier_param_shapes(config, num_classes)
    unet = init_params(config, seed=seed, dtype=dtype)
    rng, bound = np.random.default_rng([seed, 1]), 1.0 / math.sqrt(config.block_out_channels[-1])
    head = {"head.norm.weight": np.ones(shapes["head.norm.weight"]),
            "head.norm.bias": np.zeros(shapes["head.norm.bias"]),
            "head.linear.weight": rng.uniform(-bound, bound, shapes["head.linear.weight"]),
            "head.linear.bias": rng.uniform(-bound, bound, shapes["head.linear.bias"])}
    return {k: unet[k] if k in unet else head[k].astype(np.dtype(dtype)) for k in shapes}




def _check_params(params, config, x) -> None:
    """ValueError unless x fits config and params is a classifier's dict for it, in x's dtype."""
    if not isinstance(params, dict) or "head.linear.weight" not in params:
        raise ValueError("params must be a classifier's dict (from classifier_init_params or load_classifier)")
    shapes = classifier_param_shapes(config, params["head.linear.weight"].shape[0])
    check_input(params, shapes, config, x, "the classifier's params (classifier_param_shapes)")


def classifier_forward(params, config, x, t, train=False, rng=None, ops=REFERENCE):
    """logits = head(mid_block(down_blocks(conv_in(x_t), temb), temb))   (see the module docstring)

    Inputs:  params from classifier_init_params, config its (unconditional) UNetConfig;
             x (N, C, H, W) float32/float64 with H, W multiples of 2**(levels - 1); t int, scalar or (N,);
             train: dropout on (config.dropout); rng: None, an int seed or a np.random.Generator for its masks;
             ops: the table that runs each op (nn/ops.py).
    Returns: logits (N, K), and the cache for classifier_backward.
    """
    _check_params(params, config, x)
    c, p, xp = config, params, get_array_module(x)
    masks = draw_dropout_masks(c, as_rng(rng), x.shape, xp, encoder_only=True) if train and c.dropout > 0 else None
    args = BlockArgs(c.norm_num_groups, c.norm_eps, c.dropout, train, masks, ops=ops)
    # 1.-4. the U-Net's encoder walk (encoder.py): time embedding, conv_in, down, mid; no decoder reads the skips
    h, _, _, encoder = encoder_forward(p, c, x, t, args)  # (N, Cl, h, w)
    # 5. head
    h, norm = ops.groupnorm_forward(h, p["head.norm.weight"], p["head.norm.bias"], c.norm_num_groups, c.norm_eps)
    h, act_head = ops.silu_forward(h)  # (N, Cl, h, w)
    pooled = h.mean(axis=(2, 3))  # (N, Cl) global average pool
    logits, lin = ops.linear_forward(pooled, p["head.linear.weight"], p["head.linear.bias"])  # (N, K)
    cache = dict(
        ops=ops,  # the ops table that ran the forward: its backwards take these caches
        keys=tuple(p),  # the params' keys, to return grads in the same order
        encoder=encoder,  # the encoder walk's cache (time embedding, conv_in, down and mid blocks)
        norm=norm, act_head=act_head,  # caches of the head's GroupNorm and SiLU
        pool_shape=tuple(h.shape),  # (N, Cl, h, w): the pool's backward spreads over h * w positions
        lin=lin,  # head.linear's cache (holds pooled)
    )
    return logits, cache


def classifier_backward(dlogits, cache):
    """Gradients of L with dL/dlogits = dlogits through classifier_forward, in reverse (5 -> 1).

    Inputs:  dlogits (N, K); cache from classifier_forward.
    Returns: grads {key: array} with exactly params' keys (same order), dx (N, C, H, W).
    """
    check_float("dlogits", dlogits)
    g, k, xp = {}, cache, get_array_module(dlogits)
    ops = k["ops"]
    # 5. head -- forward: logits = head.linear(pooled)
    dpooled, g["head.linear.weight"], g["head.linear.bias"] = ops.linear_backward(dlogits, k["lin"])
    # forward: pooled = h.mean(axis=(2, 3))   (each of the h*w positions gets 1/(h*w) of dpooled)
    N, C, hh, ww = k["pool_shape"]
    dh = xp.broadcast_to(dpooled[:, :, None, None] / (hh * ww), (N, C, hh, ww)).copy()  # (N, Cl, h, w)
    # forward: h = silu(head.norm(h))
    dh = ops.silu_backward(dh, k["act_head"])
    dh, g["head.norm.weight"], g["head.norm.bias"] = ops.groupnorm_backward(dh, k["norm"])
    # 4.-1. forward: h, _, _, encoder = encoder_forward(x, t)   (the skips were unused: dskips None, zero)
    dx = encoder_backward(dh, None, None, None, k["encoder"], g)
    return {key: g[key] for key in k["keys"]}, dx


def log_prob_grad(params, config, x, t, y, ops=REFERENCE):
    """grad_x sum_n log p(y_n | x_n, t_n),  log p = log_softmax(classifier(x, t))   (guided-diffusion's cond_fn)

    Row n depends on x_n only (GroupNorm and attention act within a sample), so it is grad log p(y_n | x_n).
    Inputs: x (N, C, H, W); t int or (N,); y (N,) ints in [0, K) (checked on the host).
    Returns: (N, C, H, W), in x's dtype.
    """
    logits, cache = classifier_forward(params, config, x, t, ops=ops)
    _, ce = softmax_cross_entropy_forward(logits, get_array_module(x).asarray(y))
    dlogits = softmax_cross_entropy_backward(-x.shape[0], ce)  # sum_n log p(y_n | x_n) = -N * cross_entropy
    return classifier_backward(dlogits, cache)[1]
