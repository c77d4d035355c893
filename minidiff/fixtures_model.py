"""The model half of `minidiff fixtures` (see fixtures.py): forward/backward pairs of every nn op
and of the tiny U-Net, in float64, with every input drawn from a seeded host generator.

Shape legend: each NN_CASES entry names its input shapes; the U-Net is the 'tiny' preset, x (2, 3, 8, 8).
"""

from __future__ import annotations

import json

import numpy as np

from . import nn
from .model.unet import init_params, unet_backward, unet_forward
from .model.config import get_preset, to_diffusers_config

SEED = 0


def _rng(label: str) -> np.random.Generator:
    """A generator per group, so that adding a group never changes another group's inputs."""
    return np.random.default_rng([SEED, sum(label.encode())])


def _scalar(v) -> np.ndarray:
    return np.asarray(v)


# ----------------------------------------------------------------------------- nn ops

# op case: (forward, {input name: shape | ("ids", V, shape) | ("mask", p_keep, shape)}, options, gradient names)
NN_CASES = {
    "linear": (nn.linear_forward, dict(x=(2, 3, 4), w=(5, 4), b=(5,)), {}, ("x", "w", "b")),
    "conv2d.s1p1": (nn.conv2d_forward, dict(x=(2, 3, 5, 5), w=(4, 3, 3, 3), b=(4,)), dict(stride=1, padding=1),
                    ("x", "w", "b")),
    "conv2d.s2p0": (nn.conv2d_forward, dict(x=(2, 3, 6, 5), w=(4, 3, 3, 3), b=(4,)), dict(stride=2, padding=0),
                    ("x", "w", "b")),
    "conv2d.k1": (nn.conv2d_forward, dict(x=(2, 3, 3, 3), w=(4, 3, 1, 1), b=(4,)), {}, ("x", "w", "b")),
    "groupnorm.g3": (nn.groupnorm_forward, dict(x=(2, 6, 3, 3), gamma=(6,), beta=(6,)),
                     dict(num_groups=3, eps=1e-5), ("x", "gamma", "beta")),
    "groupnorm.g1": (nn.groupnorm_forward, dict(x=(2, 6, 3, 3), gamma=(6,), beta=(6,)),
                     dict(num_groups=1, eps=1e-5), ("x", "gamma", "beta")),
    "groupnorm.g6": (nn.groupnorm_forward, dict(x=(2, 6, 3, 3), gamma=(6,), beta=(6,)),
                     dict(num_groups=6, eps=1e-5), ("x", "gamma", "beta")),
    "silu": (nn.silu_forward, dict(x=(2, 3, 4)), {}, ("x",)),
    "groupnorm_silu.g3": (nn.groupnorm_silu_forward, dict(x=(2, 6, 3, 3), gamma=(6,), beta=(6,)),
                          dict(num_groups=3, eps=1e-5), ("x", "gamma", "beta")),
    "sdpa": (nn.sdpa_forward, dict(q=(2, 2, 3, 4), k=(2, 2, 5, 4), v=(2, 2, 5, 3)), {}, ("q", "k", "v")),
    "sdpa.masked": (nn.sdpa_forward, dict(q=(2, 2, 3, 4), k=(2, 2, 5, 4), v=(2, 2, 5, 3),
                                          mask=("mask", 0.6, (2, 5))), {}, ("q", "k", "v")),
    "mha.self": (nn.mha_forward, dict(x=(2, 3, 4), wq=(4, 4), bq=(4,), wk=(4, 4), bk=(4,), wv=(4, 4), bv=(4,),
                                      wo=(4, 4), bo=(4,)), dict(heads=2),
                 ("x", "context", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")),
    "mha.cross": (nn.mha_forward, dict(x=(2, 3, 4), wq=(4, 4), bq=(4,), wk=(4, 5), bk=(4,), wv=(4, 5), bv=(4,),
                                       wo=(6, 4), bo=(6,), context=(2, 2, 5)), dict(heads=2),
                  ("x", "context", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")),
    "embedding": (nn.embedding_forward, dict(ids=("ids", 5, (2, 3)), weight=(5, 4)), {}, ("weight",)),
    "upsample_nearest2x": (nn.upsample_nearest2x_forward, dict(x=(2, 3, 2, 3)), {}, ("x",)),
    "downsample.p1": (nn.downsample_forward, dict(x=(2, 3, 5, 4), w=(4, 3, 3, 3), b=(4,)), dict(padding=1),
                      ("x", "w", "b")),
    "downsample.p0": (nn.downsample_forward, dict(x=(2, 3, 5, 4), w=(4, 3, 3, 3), b=(4,)), dict(padding=0),
                      ("x", "w", "b")),
    "avgpool2x2": (nn.avgpool2x2_forward, dict(x=(2, 3, 5, 4)), {}, ("x",)),
    "dropout": (nn.dropout_forward, dict(x=(2, 3, 4), mask=("mask", 0.75, (2, 3, 4))), dict(p=0.25), ("x",)),
    "mse": (nn.mse_forward, dict(pred=(2, 3, 4), target=(2, 3, 4)), {}, ("pred", "target")),
    "softmax_cross_entropy": (nn.softmax_cross_entropy_forward, dict(logits=(4, 5), labels=("ids", 5, (4,))), {},
                              ("logits",)),
}
BACKWARDS = {nn.linear_forward: nn.linear_backward, nn.conv2d_forward: nn.conv2d_backward,
             nn.groupnorm_forward: nn.groupnorm_backward, nn.silu_forward: nn.silu_backward,
             nn.groupnorm_silu_forward: nn.groupnorm_silu_backward,
             nn.sdpa_forward: nn.sdpa_backward, nn.mha_forward: nn.mha_backward,
             nn.embedding_forward: nn.embedding_backward, nn.upsample_nearest2x_forward: nn.upsample_nearest2x_backward,
             nn.downsample_forward: nn.downsample_backward, nn.avgpool2x2_forward: nn.avgpool2x2_backward,
             nn.dropout_forward: nn.dropout_backward, nn.mse_forward: nn.mse_backward,
             nn.softmax_cross_entropy_forward: nn.softmax_cross_entropy_backward}


def nn_inputs(op: str, rng: np.random.Generator) -> dict:
    """The drawn inputs of one NN_CASES entry (float64 arrays, int64 ids, bool masks)."""
    inputs = {}
    for name, spec in NN_CASES[op][1].items():
        if spec[0] == "ids":
            inputs[name] = rng.integers(0, spec[1], size=spec[2])  # int64, with repeats
        elif spec[0] == "mask":
            mask = rng.random(spec[2]) < spec[1]  # True = keep
            mask[:, 0] = True  # every row keeps a key
            inputs[name] = mask
        else:
            inputs[name] = rng.standard_normal(spec)
    return inputs


def nn_fixtures() -> dict:
    """nn.<op>.<input>, nn.<op>.y, nn.<op>.dy (upstream gradient), nn.<op>.d<input> (gradients)."""
    rng, out = _rng("nn"), {}
    for op, (forward, _, options, grad_names) in NN_CASES.items():
        inputs = nn_inputs(op, rng)
        y, cache = forward(**inputs, **options)
        dy = rng.standard_normal(np.shape(y))
        grads = BACKWARDS[forward](np.asarray(dy), cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        key = f"nn.{op}"
        out.update({f"{key}.{name}": v for name, v in inputs.items()})
        out.update({f"{key}.{name}": _scalar(v) for name, v in options.items()})
        out.update({f"{key}.y": np.asarray(y), f"{key}.dy": np.asarray(dy)})
        out.update({f"{key}.d{name}": g for name, g in zip(grad_names, grads) if g is not None})
    return out


def unet_fixtures() -> dict:
    """The 'tiny' preset in float64: param.<state-dict key>, x, t, y = unet(x, t), dy, dx and
    grad.<state-dict key>; config_json / diffusers_config_json hold its config as JSON text."""
    rng, config = _rng("unet"), get_preset("tiny")
    params = init_params(config, seed=SEED, dtype=np.float64)
    for k, v in params.items():  # GroupNorm scales and shifts off 1 and 0, so their gradients are generic
        if v.ndim == 1 and "norm" in k:
            params[k] = v + 0.2 * rng.standard_normal(v.shape)
    x = rng.standard_normal((2, config.in_channels, config.sample_size, config.sample_size))
    t = np.array([3, 700])
    y, cache = unet_forward(params, config, x, t)
    dy = rng.standard_normal(y.shape)
    grads, dx = unet_backward(dy, cache)
    out = {"config_json": np.array(config.to_json()),
           "diffusers_config_json": np.array(json.dumps(to_diffusers_config(config), sort_keys=True)),
           "x": x, "t": t, "y": y, "dy": dy, "dx": dx}
    out.update({f"param.{k}": v for k, v in params.items()})
    out.update({f"grad.{k}": v for k, v in grads.items()})
    return out
