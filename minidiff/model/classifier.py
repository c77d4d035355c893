"""A noise-aware classifier p(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021, sec. 4.1):
the U-Net's down path with a pooled linear head, its hand-written backward, and the loader that turns
a checkpoint into the grad_fn that sampling uses. Training is in classifier_train.py.

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
from dataclasses import dataclass

import numpy as np

from ..backend import get_array_module, to_device, to_numpy
from .blocks import BlockArgs, down_block_backward, down_block_forward, mid_block_backward, mid_block_forward
from ..train.bundle import resolve_checkpoint
from ..train.checkpoint import load_checkpoint
from ..data.dataset import caption_of
from ..nn import (conv2d_backward, conv2d_forward, groupnorm_backward, groupnorm_forward, linear_backward,
                 linear_forward, silu_backward, silu_forward, softmax_cross_entropy_backward,
                 softmax_cross_entropy_forward, timestep_embedding)
from ..nn._check import check_float, check_indices, check_ndim, check_shape
from ..nn.cross_entropy import log_softmax
from ..diffusion.schedule import check_choice, make_schedule
from .unet import init_params, param_shapes
from .config import UNetConfig
from .dropout import draw_dropout_masks

SHARED = ("time_embedding.", "conv_in.", "down_blocks.", "mid_block.")  # key prefixes taken from the U-Net


def classifier_param_shapes(config: UNetConfig, num_classes: int) -> dict:
    """{key: shape}: the U-Net's time embedding, conv_in, down and mid blocks, then the head."""
    if not isinstance(config, UNetConfig) or config.num_class_embeds or config.cross_attention_dim:
        raise ValueError("config must be an unconditional UNetConfig (no num_class_embeds, no cross_attention_dim)")
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
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
    if not isinstance(params, dict) or "head.linear.weight" not in params:
        raise ValueError("params must be a classifier's dict (from classifier_init_params or load_classifier)")
    shapes = classifier_param_shapes(config, params["head.linear.weight"].shape[0])
    if params.keys() != shapes.keys():
        missing, extra = sorted(set(shapes) - set(params))[:3], sorted(set(params) - set(shapes))[:3]
        raise ValueError(f"params must hold exactly the classifier's keys; missing {missing}, unexpected {extra}")
    for key, shape in shapes.items():
        if tuple(params[key].shape) != shape or params[key].dtype != x.dtype:
            raise ValueError(f"params[{key!r}] must have shape {shape} and x's dtype {x.dtype}, got "
                             f"{tuple(params[key].shape)} {params[key].dtype}")


def classifier_forward(params, config, x, t, train=False, rng=None):
    """logits = head(mid_block(down_blocks(conv_in(x_t), temb), temb))   (see the module docstring)

    Inputs:  params from classifier_init_params, config its (unconditional) UNetConfig;
             x (N, C, H, W) float32/float64 with H, W multiples of 2**(levels - 1); t int, scalar or (N,);
             train: dropout on (config.dropout); rng: None, an int seed or a np.random.Generator for its masks.
    Returns: logits (N, K), and the cache for classifier_backward.
    """
    check_float("x", x)
    check_ndim("x", x, 4, "(N, C, H, W)")
    c, xp, (N, _, H, W) = config, get_array_module(x), x.shape
    boc, n = config.block_out_channels, len(config.block_out_channels)
    check_shape("x", x, (N, c.in_channels, H, W), "(N, in_channels, H, W)")
    if H % 2 ** (n - 1) or W % 2 ** (n - 1):
        raise ValueError(f"x's height and width must be multiples of {2 ** (n - 1)}, got {H}x{W}")
    _check_params(params, c, x)
    t = xp.asarray(to_numpy(t) if xp is np else t)
    t = xp.broadcast_to(t, (N,)) if t.ndim == 0 else t
    check_shape("t", t, (N,), "(N,) or a scalar")
    if rng is not None and not isinstance(rng, (int, np.integer, np.random.Generator)):
        raise ValueError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__}")
    masks = None
    if train and c.dropout > 0:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        masks = draw_dropout_masks(c, gen, x.shape, xp, encoder_only=True)
    args = BlockArgs(c.norm_num_groups, c.norm_eps, c.dropout, train, masks)
    p = params
    # 1. time embedding -> temb (N, T)
    t_emb = timestep_embedding(t, boc[0], c.flip_sin_to_cos, c.freq_shift, dtype=x.dtype)
    e, lin1 = linear_forward(t_emb, p["time_embedding.linear_1.weight"], p["time_embedding.linear_1.bias"])
    e, act = silu_forward(e)  # (N, T)
    temb, lin2 = linear_forward(e, p["time_embedding.linear_2.weight"], p["time_embedding.linear_2.bias"])
    # 2. conv_in
    h, conv_in = conv2d_forward(x, p["conv_in.weight"], p["conv_in.bias"], padding=1)  # (N, C0, H, W)
    # 3. down (there is no decoder, so the skips are dropped)
    downs = []
    for i, kind in enumerate(c.down_block_types):
        heads = c.heads(boc[i]) if kind == "AttnDownBlock2D" else None
        h, skips, dc = down_block_forward(p, f"down_blocks.{i}.", h, temb, c.layers_per_block, heads, i < n - 1,
                                          c.downsample_padding, args)
        downs.append((dc, len(skips)))
    # 4. mid
    heads = c.heads(boc[-1]) if c.add_attention else None
    h, mid = mid_block_forward(p, "mid_block.", h, temb, heads, c.mid_block_scale_factor, args)  # (N, Cl, h, w)
    # 5. head
    h, norm = groupnorm_forward(h, p["head.norm.weight"], p["head.norm.bias"], c.norm_num_groups, c.norm_eps)
    h, act_head = silu_forward(h)  # (N, Cl, h, w)
    pooled = h.mean(axis=(2, 3))  # (N, Cl) global average pool
    logits, lin = linear_forward(pooled, p["head.linear.weight"], p["head.linear.bias"])  # (N, K)
    cache = dict(
        keys=tuple(p),  # the params' keys, to return grads in the same order
        lin1=lin1, act=act, lin2=lin2,  # time-embedding MLP caches
        conv_in=conv_in,  # the stem's cache
        downs=downs,  # per down block: (block cache, how many skips it made, all with zero gradient)
        mid=mid,  # mid-block cache
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
    # 5. head -- forward: logits = head.linear(pooled)
    dpooled, g["head.linear.weight"], g["head.linear.bias"] = linear_backward(dlogits, k["lin"])
    # forward: pooled = h.mean(axis=(2, 3))   (each of the h*w positions gets 1/(h*w) of dpooled)
    N, C, hh, ww = k["pool_shape"]
    dh = xp.broadcast_to(dpooled[:, :, None, None] / (hh * ww), (N, C, hh, ww)).copy()  # (N, Cl, h, w)
    # forward: h = silu(head.norm(h))
    dh = silu_backward(dh, k["act_head"])
    dh, g["head.norm.weight"], g["head.norm.bias"] = groupnorm_backward(dh, k["norm"])
    # 4. mid -- forward: h = mid_block(h, temb)
    dh, dtemb, _ = mid_block_backward(dh, k["mid"], g)
    # 3. down -- forward: h, skips = down_block(h, temb)   (the skips were dropped: zero gradient)
    zero = dh.dtype.type(0)
    for dc, count in reversed(k["downs"]):
        dh, dt, _ = down_block_backward(dh, [zero] * count, dc, g)
        dtemb = dtemb + dt  # temb feeds every block: summed
    # 2. conv_in -- forward: h = conv_in(x)
    dx, g["conv_in.weight"], g["conv_in.bias"] = conv2d_backward(dh, k["conv_in"])
    # 1. forward: temb = linear_2(silu(linear_1(t_emb)))   (t_emb has no parameters)
    de, g["time_embedding.linear_2.weight"], g["time_embedding.linear_2.bias"] = linear_backward(dtemb, k["lin2"])
    de = silu_backward(de, k["act"])
    _, g["time_embedding.linear_1.weight"], g["time_embedding.linear_1.bias"] = linear_backward(de, k["lin1"])
    return {key: g[key] for key in k["keys"]}, dx


def log_prob_grad(params, config, x, t, y):
    """grad_x sum_n log p(y_n | x_n, t_n),  log p = log_softmax(classifier(x, t))   (guided-diffusion's cond_fn)

    Row n depends on x_n only (GroupNorm and attention act within a sample), so it is grad log p(y_n | x_n).
    Inputs: x (N, C, H, W); t int or (N,); y (N,) ints in [0, K) (checked on the host).
    Returns: (N, C, H, W), in x's dtype.
    """
    logits, cache = classifier_forward(params, config, x, t)
    _, ce = softmax_cross_entropy_forward(logits, get_array_module(x).asarray(y))
    dlogits = softmax_cross_entropy_backward(-x.shape[0], ce)  # sum_n log p(y_n | x_n) = -N * cross_entropy
    return classifier_backward(dlogits, cache)[1]


@dataclass
class Classifier:
    """A trained classifier on one device, ready to guide sampling (load_classifier builds it)."""

    params: dict
    config: UNetConfig
    num_classes: int
    class_names: list | None
    schedule: object  # the schedule it was trained with: guidance must use the same abar_t
    device: str = "cpu"

    def log_probs(self, x_t, t):
        """log p(k | x_t, t), (N, K)."""
        return log_softmax(classifier_forward(self.params, self.config, x_t, t)[0], axis=1)

    def make_grad_fn(self, labels):
        """grad_fn(x_t, t, y) -> grad_x log p(labels | x_t) for classifier_guided_eps; y is ignored (the model's
        condition, e.g. token ids), the host labels (N,) in [0, K) are moved to the device once."""
        host = np.asarray(labels)
        check_ndim("labels", host, 1, "(N,)")
        check_indices("labels", host, self.num_classes)
        y = to_device(host.astype(np.int64), self.device)
        dtype = self.params["head.linear.weight"].dtype

        def grad_fn(x_t, t, y_ignored=None):
            if x_t.shape[0] != host.shape[0]:
                raise ValueError(f"x_t holds {x_t.shape[0]} samples but the classifier got {host.shape[0]} labels")
            return log_prob_grad(self.params, self.config, x_t.astype(dtype, copy=False), t, y).astype(x_t.dtype)
        return grad_fn

    def check_compatible(self, bundle) -> None:
        """Raise ValueError unless bundle makes images of this classifier's size and uses its schedule."""
        c, b, s = self.config, bundle.config, bundle.schedule
        if (c.sample_size, c.in_channels) != (b.sample_size, b.in_channels):
            raise ValueError(f"the classifier reads {c.sample_size}x{c.sample_size} images with {c.in_channels} "
                             f"channels, the diffusion model makes {b.sample_size}x{b.sample_size} with "
                             f"{b.in_channels}")
        if len(s) != len(self.schedule) or not np.allclose(s.alphas_cumprod, self.schedule.alphas_cumprod):
            raise ValueError(f"the classifier was trained with num_train_timesteps={len(self.schedule)}, beta_schedule="
                             f"{self.schedule.beta_schedule!r}, the diffusion model uses {len(s)}, {s.beta_schedule!r};"
                             " train the classifier with the model's --num-train-timesteps and --beta-schedule")

    def class_of_prompt(self, prompt: str) -> int:
        """The class whose name's words all occur in the prompt (the one with the most words wins)."""
        words, names = set(str(prompt).lower().split()), self.class_names or [str(k) for k in range(self.num_classes)]
        hits = [(len(set(caption_of(nm).split())), k) for k, nm in enumerate(names)
                if caption_of(nm) and set(caption_of(nm).split()) <= words]
        best = [k for n, k in hits if n == max(hits)[0]] if hits else []
        if len(best) != 1:
            why = "names no class" if not best else f"matches classes {[names[k] for k in best]} equally"
            raise ValueError(f"prompt {prompt!r} {why} of the classifier; a prompt must contain every word of one "
                             f"class name: {', '.join(names)}")
        return best[0]

    def targets_for(self, bundle, cond, labels, sample_cfg):
        """int64 (n,) target classes: a class model's class ids (cond), a text model's prompts (labels) mapped
        by class_of_prompt, or sample_cfg.class_id for an unconditional model."""
        self.check_compatible(bundle)
        if bundle.conditioning == "class":
            names = bundle.class_names
            if names and self.class_names and list(names) != list(self.class_names):
                raise ValueError(f"the model's classes {names} differ from the classifier's {self.class_names}")
            targets = np.asarray(to_numpy(cond)).astype(np.int64).reshape(-1)
        elif bundle.conditioning == "text":
            if labels is None:
                raise ValueError("labels must hold the prompts of a text-conditioned model, got None")
            targets = np.array([self.class_of_prompt(p) for p in labels], np.int64)
        elif sample_cfg.class_id < 0:
            raise ValueError(f"the diffusion model is unconditional: pass --class ID (0..{self.num_classes - 1}) to "
                             "name the class the classifier should guide toward")
        else:
            targets = np.full(sample_cfg.n, sample_cfg.class_id, np.int64)
        bad = targets[(targets < 0) | (targets >= self.num_classes)]
        if bad.size:
            raise ValueError(f"--class must be in [0, {self.num_classes}) for this classifier, got {bad[0]}")
        return targets


def load_classifier(path, device: str = "cpu", dtype: str = "float32") -> Classifier:
    """Load a train-classifier run directory or checkpoint .npz onto device, in dtype."""
    check_choice("dtype", dtype, {"float32", "float64"})
    p = resolve_checkpoint(path)
    arrays, meta = load_checkpoint(p)
    if meta.get("kind") != "classifier":
        raise ValueError(f"{str(p)!r} is not a classifier checkpoint; pass one written by minidiff train-classifier")
    config, K = UNetConfig.from_dict(meta["model_config"]), int(meta["num_classes"])
    shapes, src = classifier_param_shapes(config, K), arrays.get("params", {})
    bad = sorted(k for k in set(shapes) | set(src) if k not in src or k not in shapes or src[k].shape != shapes[k])
    if bad:
        raise ValueError(f"checkpoint {str(p)!r} does not match its classifier config (first bad key {bad[0]!r})")
    params = {k: to_device(np.asarray(src[k], dtype=dtype), device) for k in shapes}
    t = meta["train_config"]
    return Classifier(params, config, K, meta.get("class_names"),
                      make_schedule(t["num_train_timesteps"], t["beta_schedule"]), device)


def __getattr__(name):
    """The training half lives in classifier_train.py (file size); this keeps `from minidiff.model.classifier import
    train_classifier` working, imported lazily (classifier_train imports this module)."""
    if name in ("ClassifierTrainConfig", "train_classifier", "add_classifier_parser", "validate_classifier_config"):
        from ..train import classifier as classifier_train
        return getattr(classifier_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
