"""The GEMM-limited time of `minidiff bench`: the step's matmul FLOPs over a float32 GEMM's measured rate.

    FLOPs(sample step) = 2 sum_ops MACs(op)             forward only: every conv, linear and attention matmul
    FLOPs(train step)  = 3 FLOPs(sample step)           backward: dx and dw of each conv/linear (each the
                                                        forward's MACs), four attention matmuls for its two
    GEMM-limited time  = sum_ops FLOPs(op) / rate(op's GEMM shape)   rates of np.matmul, measured in this run
                         (and, stricter, FLOPs / the rate of one 1024^3 GEMM, near BLAS's best)

MACs (multiply-adds) of one call, from its shapes (direct convolution, as PyTorch's profilers count; Winograd
does fewer multiplies, so it can beat this bound):
    conv2d   N C_out Ho Wo C_in kh kw        (downsample: the same, stride 2)
    linear   prod(x.shape[:-1]) d_in d_out
    sdpa     N h L S D + N h L S Dv          (q k^T, then p v; the softmax is not a matmul)
Elementwise ops (GroupNorm, SiLU, the loss, AdamW) are not counted: the bound is the matmuls alone.

The ops are counted by running unet_forward once at batch 1 with a table whose conv/linear/attention
functions record their shapes (the model's own structure, no second copy of it), then scaling by N: every
op's MACs are proportional to the batch. tests/test_bench_flops.py checks each formula and a tiny config's
total against a hand sum.

Shape legend: N batch, C channels, H W spatial (Ho Wo out), h heads, L queries, S keys, D head dim,
K = C_in kh kw the im2col depth, P positions (GEMM columns).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter

import numpy as np

from .model.unet import unet_forward, init_params
from .nn.ops import REFERENCE

GEMM_COLUMNS = 4096  # each conv GEMM timed with at most this many columns (minidiff's conv works in batch chunks)
GEMM_MIN_SECONDS = 0.02  # time each GEMM shape for at least this long (then the median of its calls)
SQUARE = (1, 1024, 1024, 1024)  # a large square GEMM: near the BLAS's best rate, the stricter bound


def conv_macs(x_shape, w_shape, y_shape) -> int:
    """N C_out Ho Wo C_in kh kw: y (N, C_out, Ho, Wo) from x (N, C_in, H, W) and w (C_out, C_in, kh, kw)."""
    n, c_out, ho, wo = y_shape
    return n * c_out * ho * wo * int(np.prod(w_shape[1:]))


def linear_macs(x_shape, w_shape) -> int:
    """prod(x.shape[:-1]) d_in d_out: x (..., d_in) @ w^T, w (d_out, d_in)."""
    return int(np.prod(x_shape[:-1])) * w_shape[1] * w_shape[0]


def sdpa_macs(q_shape, k_shape, v_shape) -> int:
    """N h L S D + N h L S Dv: q k^T (N, h, L, S), then p v (N, h, L, Dv)."""
    n, h, l, d = q_shape
    s, dv = k_shape[2], v_shape[3]
    return n * h * l * s * (d + dv)


def count_forward(config, batch: int = 1, size: int | None = None) -> list[tuple]:
    """The matmuls of one unet_forward of `config` at (batch, C, size, size), in call order:
    [(kind, macs, gemm)], kind 'conv' / 'linear' / 'sdpa', gemm the (batch, M, K, P) of the GEMM it is."""
    size = config.sample_size if size is None else size
    calls = []

    def conv(fn):
        def counted(x, w, b, *args, **kwargs):
            y, cache = fn(x, w, b, *args, **kwargs)
            k = int(np.prod(w.shape[1:]))
            calls.append(("conv", conv_macs(x.shape, w.shape, y.shape),
                          (1, w.shape[0], k, y.shape[0] * y.shape[2] * y.shape[3])))  # (C_out, K) @ (K, N Ho Wo)
            return y, cache
        return counted

    def linear(x, w, b=None):
        calls.append(("linear", linear_macs(x.shape, w.shape), (1, int(np.prod(x.shape[:-1])), w.shape[1], w.shape[0])))
        return REFERENCE.linear_forward(x, w, b)

    def sdpa(q, k, v, *args, **kwargs):
        n, h, l, d = q.shape
        calls.append(("sdpa", sdpa_macs(q.shape, k.shape, v.shape), (n * h, l, d, k.shape[2])))  # q k^T; p v alike
        return REFERENCE.sdpa_forward(q, k, v, *args, **kwargs)

    ops = dataclasses.replace(REFERENCE, conv2d_forward=conv(REFERENCE.conv2d_forward),
                              downsample_forward=conv(REFERENCE.downsample_forward),
                              linear_forward=linear, sdpa_forward=sdpa)
    params = init_params(config, seed=0, dtype=np.float32)
    x = np.zeros((batch, config.in_channels, size, size), np.float32)
    t = np.zeros(batch, np.int64)
    labels = None if config.num_class_embeds is None else np.zeros(batch, np.int64)
    context = None if config.cross_attention_dim is None else np.ones((batch, 1), np.int64)
    unet_forward(params, config, x, t, labels, context, for_backward=False, ops=ops)
    return calls


def step_flops(config, batch: int, size: int | None = None) -> dict:
    """{'sample': FLOPs of one forward, 'train': 3x that, 'by_kind': forward FLOPs per kind} at batch N."""
    calls = count_forward(config, 1, size)
    by_kind = Counter()
    for kind, macs, _ in calls:
        by_kind[kind] += 2 * macs * batch
    forward = sum(by_kind.values())
    return dict(sample=forward, train=3 * forward, by_kind=dict(by_kind))


def gemm_shapes(config, batch: int, size: int | None = None) -> Counter:
    """{(b, M, K, P): forward FLOPs at batch N done in GEMMs of that shape} (P capped at GEMM_COLUMNS)."""
    shapes = Counter()
    for kind, macs, (b, m, k, p) in count_forward(config, 1, size):
        if kind == "conv":
            p = min(p * batch, GEMM_COLUMNS)
        elif kind == "linear":
            m = m * batch
        else:
            b = b * batch
        shapes[(b, m, k, p)] += 2 * macs * batch
    return shapes


def gemm_seconds(shape, dtype=np.float32, timer=time.perf_counter, rng=None) -> float:
    """Median time of np.matmul of (b, M, K) by (b, K, P) (b = 1: 2-d), called for >= GEMM_MIN_SECONDS."""
    rng = np.random.default_rng(0) if rng is None else rng
    b, m, k, p = shape
    lead = () if b == 1 else (b,)
    a = rng.standard_normal(lead + (m, k)).astype(dtype)
    c = rng.standard_normal(lead + (k, p)).astype(dtype)
    out = np.matmul(a, c)  # warm-up, and the output buffer
    times, start = [], timer()
    while len(times) < 3 or timer() - start < GEMM_MIN_SECONDS:
        t0 = timer()
        np.matmul(a, c, out=out)
        times.append(timer() - t0)
    return max(statistics.median(times), 1e-9)


def gemm_limited(config, batch: int, size: int | None = None, dtype=np.float32, timer=time.perf_counter) -> dict:
    """The step's FLOPs and its GEMM-limited time in ms, each matmul at the rate np.matmul reaches on its shape
    (at the BLAS threads in force: the bench has set them to --threads).

    Returns dict(sample_flops, train_flops, gemm_gflops (the FLOP-weighted rate), sample_ms, train_ms, and
    square_gflops, square_sample_ms, square_train_ms: the same at the rate of a 1024^3 GEMM)."""
    flops = step_flops(config, batch, size)
    seconds = 0.0
    for shape, f in gemm_shapes(config, batch, size).items():
        b, m, k, p = shape
        seconds += f / (2 * b * m * k * p / gemm_seconds(shape, dtype, timer))  # FLOPs / (FLOP/s on this shape)
    rate = flops["sample"] / seconds
    b, m, k, p = SQUARE
    square = 2 * b * m * k * p / gemm_seconds(SQUARE, dtype, timer)  # FLOP/s
    return dict(sample_flops=flops["sample"], train_flops=flops["train"], gemm_gflops=rate / 1e9,
                sample_ms=1e3 * seconds, train_ms=3e3 * seconds, square_gflops=square / 1e9,
                square_sample_ms=1e3 * flops["sample"] / square, square_train_ms=1e3 * flops["train"] / square)


def gemm_lines(limit: dict, rows: list[dict]) -> list[str]:
    """The printed lines: FLOPs, the GEMM rate, the GEMM-limited time and each side's time as a multiple of it."""
    lines = [f"GEMM-limited time: np.matmul at {limit['gemm_gflops']:.0f} GFLOP/s on the network's matmul shapes (in "
             f"brackets: at {limit['square_gflops']:.0f} GFLOP/s, a 1024^3 GEMM's rate); measured now, same threads and clock"]
    for what, key in (("train step", "train"), ("sample step", "sample")):
        row = next((r for r in rows if r["what"].startswith(what)), None)
        ms, square_ms = limit[f"{key}_ms"], limit[f"square_{key}_ms"]
        text = f"  {what}: {limit[f'{key}_flops'] / 1e9:.3g} GFLOP -> GEMM-limited {_ms(ms)} ({_ms(square_ms)}) ms"
        for side in ("minidiff", "torch"):
            if row is not None and row[side] is not None:
                text += f"; {side} {row[side] / ms:.2f}x ({row[side] / square_ms:.2f}x)"
        lines.append(text)
    return lines


def _ms(ms: float) -> str:
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"
