"""minidiff/bench_flops.py: the matmul FLOPs of a step, counted from the model's own calls, against hand sums.

Each op's MAC formula is checked against an independent count (the sum of a product of all-ones arrays is
the number of multiply-adds), and the tiny preset's whole forward against the layers written out by hand
from its config (diffusers' UNet2DModel layout: skips, shortcuts, up blocks with one more resnet).
"""

import dataclasses

import numpy as np
import pytest

from minidiff import bench, bench_flops
from minidiff.model.config import get_preset
from minidiff.nn.conv2d import conv2d_forward


def test_conv_macs_is_the_number_of_multiply_adds():
    # all-ones x and w, no padding: every output is sum of C_in kh kw ones, so sum(y) counts the products
    x, w = np.ones((2, 3, 7, 6)), np.ones((4, 3, 3, 2))
    for stride in (1, 2):
        y, _ = conv2d_forward(x, w, None, stride=stride)
        assert bench_flops.conv_macs(x.shape, w.shape, y.shape) == y.sum() == 2 * 4 * y.shape[2] * y.shape[3] * 3 * 3 * 2


def test_linear_and_sdpa_macs_are_the_number_of_multiply_adds():
    x, w = np.ones((2, 5, 7)), np.ones((3, 7))
    assert bench_flops.linear_macs(x.shape, w.shape) == (x @ w.T).sum() == 2 * 5 * 7 * 3
    q, k, v = np.ones((2, 3, 4, 5)), np.ones((2, 3, 6, 5)), np.ones((2, 3, 6, 7))
    scores = q @ k.swapaxes(-1, -2)  # (N, h, L, S), each entry D products
    assert bench_flops.sdpa_macs(q.shape, k.shape, v.shape) == scores.sum() + (np.ones_like(scores) @ v).sum()


def _tiny_forward_macs(n: int, s: int) -> int:
    """The tiny preset's forward, layer by layer (block_out_channels (8, 16), one resnet per down block, two per
    up block, attention at the lower resolution and in the mid block, time embedding 8 -> 32 -> 32)."""
    temb = 32

    def conv(cin, cout, hw, k=3):
        return n * cout * hw * hw * cin * k * k

    def resnet(cin, cout, hw):  # conv1, time_emb_proj, conv2, and the 1x1 shortcut when the width changes
        return conv(cin, cout, hw) + n * temb * cout + conv(cout, cout, hw) + (conv(cin, cout, hw, 1) if cin != cout else 0)

    def attention(c, hw, head_dim=8):  # to_q, to_k, to_v, to_out; q k^T and p v over L = S = hw^2 tokens
        tokens = hw * hw
        return 4 * n * tokens * c * c + 2 * n * (c // head_dim) * tokens * tokens * head_dim

    h, q = s, s // 2
    macs = n * 8 * temb + n * temb * temb  # time embedding linear_1, linear_2
    macs += conv(3, 8, h)  # conv_in                                            skips: 8 @ h
    macs += resnet(8, 8, h) + n * 8 * q * q * 8 * 9  # down 0 + its stride-2 downsample   8 @ h, 8 @ q
    macs += resnet(8, 16, q) + attention(16, q)  # down 1 (attention)                 16 @ q
    macs += 2 * resnet(16, 16, q) + attention(16, q)  # mid
    macs += resnet(16 + 16, 16, q) + resnet(16 + 8, 16, q) + 2 * attention(16, q)  # up 0 (attention)
    macs += conv(16, 16, h)  # its upsampler's conv, after the nearest 2x
    macs += resnet(16 + 8, 8, h) + resnet(8 + 8, 8, h)  # up 1
    return macs + conv(8, 3, h)  # conv_out


@pytest.mark.parametrize("n, s", [(1, 8), (3, 16)])
def test_tiny_forward_count_is_the_hand_sum(n, s):
    calls = bench_flops.count_forward(get_preset("tiny"), n, s)
    assert sum(macs for _, macs, _ in calls) == _tiny_forward_macs(n, s)
    assert {kind for kind, _, _ in calls} == {"conv", "linear", "sdpa"}


def test_step_flops_scale_the_batch_and_triple_for_training():
    config = get_preset("tiny")
    flops = bench_flops.step_flops(config, 3, 16)
    assert flops["sample"] == 2 * _tiny_forward_macs(3, 16) == sum(flops["by_kind"].values())
    assert flops["train"] == 3 * flops["sample"]


def test_small_at_32x32_is_the_issues_figure():
    """issue 23: 'a 32x32 training step of small is 95.9 GFLOP' (batch 64): convs 31.16, linears 0.55, attention
    0.27 GFLOP per forward."""
    flops = bench_flops.step_flops(get_preset("small"), 64, 32)
    assert flops["train"] == 95_944_704_000
    assert flops["by_kind"] == {"conv": 31_163_678_720, "linear": 549_453_824, "sdpa": 268_435_456}


def test_gemm_limited_time_is_flops_over_the_rate():
    config = dataclasses.replace(get_preset("tiny"), sample_size=8)
    limit = bench_flops.gemm_limited(config, 2, 8)
    assert limit["train_flops"] == 3 * limit["sample_flops"] == 3 * bench_flops.step_flops(config, 2, 8)["sample"]
    assert limit["gemm_gflops"] > 0
    assert limit["sample_ms"] == pytest.approx(limit["sample_flops"] / (limit["gemm_gflops"] * 1e9) * 1e3)
    assert limit["train_ms"] == pytest.approx(3 * limit["sample_ms"])
    assert limit["square_gflops"] > 0
    assert limit["square_train_ms"] == pytest.approx(limit["train_flops"] / (limit["square_gflops"] * 1e9) * 1e3)
    # every FLOP is assigned to exactly one GEMM shape
    assert sum(bench_flops.gemm_shapes(config, 2, 8).values()) == limit["sample_flops"]


def test_bench_prints_the_gemm_limited_multiples():
    lines = []
    rows = bench.run_bench(preset="tiny", batch=2, repeats=1, warmup=0, rounds=1, use_torch=False, memory=False,
                           log=lines.append)
    assert any(line.startswith("GEMM-limited time: np.matmul at ") for line in lines)
    flops = bench_flops.step_flops(get_preset("tiny"), 2, 8)
    for r, key in zip(rows, ("train", "sample")):
        assert r["flops"] == flops[key] and r["gemm_limited_ms"] > 0
        line = next(line for line in lines if line.strip().startswith(key))
        assert (f"minidiff {r['minidiff'] / r['gemm_limited_ms']:.2f}x "
                f"({r['minidiff'] / r['square_gemm_limited_ms']:.2f}x)") in line
