"""Op by op on the CPU: minidiff's fast conv and GroupNorm+SiLU beside PyTorch's, at the U-Net's shapes.

    python scripts/op_bench.py                 # `small` at 32x32, batch 32, 1 thread, CPU time
    python scripts/op_bench.py --preset ddpm-cifar10 --batch 8 --repeats 9

Each row times one op alone, forward and forward + backward, on the same float32 inputs, at each level of
the preset (its channels at that level in and out, the image side halved per level, its GroupNorm groups):
    conv3x3        minidiff.fast.conv.conv2d_forward/backward (Winograd F(2x2, 3x3) at these shapes)
                   beside torch.nn.functional.conv2d (oneDNN) and its autograd backward
    groupnorm+silu minidiff.fast.norm.groupnorm_silu_forward/backward beside F.silu(F.group_norm(...))
    gemm           np.matmul (NumPy's BLAS, OpenBLAS in the wheels) beside torch.matmul (PyTorch's BLAS) on
                   the GEMM shapes these convs make: Winograd's (P, C) @ (C, C), one per transform entry, P the
                   2x2 tiles of one batch chunk (fast/cpu/winograd.py's CHUNK_BYTES), or, where the conv takes
                   im2col (fast/conv.py's choose_lowering), (C, 9 C) @ (9 C, n S^2) for a chunk of n samples;
                   and a 1x1 conv's (C, C) @ (C, S^2) per sample
Both sides run in this process with one thread (threadpoolctl for OpenBLAS, torch.set_num_threads(1)) and
glibc's malloc keeping freed memory (fast/cpu/allocator.py, as the CLI and the bench do), so that the
figures say where a step's time goes (docs/performance.md, "Issue 23, second pass"); whole steps are
`minidiff bench`'s. Without torch it prints minidiff's column alone.

Shape legend: N batch, C channels (in = out), S image side.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from minidiff.fast.conv import choose_lowering, conv2d_backward, conv2d_forward
from minidiff.fast.cpu.conv_lowering import chunks
from minidiff.fast.cpu import winograd
from minidiff.fast.cpu.allocator import keep_freed_memory
from minidiff.fast.norm import groupnorm_silu_backward, groupnorm_silu_forward
from minidiff.model.config import get_preset


def cpu_ms(fn, repeats: int) -> float:
    """Median CPU time of fn() in ms over `repeats` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return 1000 * float(np.median(times))


def minidiff_ops(x, w, b, gamma, beta, dy, groups, repeats):
    """(conv fwd, conv fwd+bwd, gn+silu fwd, gn+silu fwd+bwd) ms for minidiff's fast ops."""
    conv = lambda: conv2d_forward(x, w, b, 1, 1)  # noqa: E731
    conv_fb = lambda: conv2d_backward(dy, conv2d_forward(x, w, b, 1, 1)[1])  # noqa: E731
    norm = lambda: groupnorm_silu_forward(x, gamma, beta, groups)  # noqa: E731
    norm_fb = lambda: groupnorm_silu_backward(dy, groupnorm_silu_forward(x, gamma, beta, groups)[1])  # noqa: E731
    return [cpu_ms(f, repeats) for f in (conv, conv_fb, norm, norm_fb)]


def torch_ops(torch, x, w, b, gamma, beta, dy, groups, repeats):
    """The same four figures for PyTorch eager (autograd for the backwards)."""
    F = torch.nn.functional
    xt, wt, bt, gt, et = (torch.from_numpy(a).requires_grad_() for a in (x, w, b, gamma, beta))
    dyt = torch.from_numpy(dy)

    def conv():
        with torch.no_grad():
            F.conv2d(xt, wt, bt, padding=1)

    def norm():
        with torch.no_grad():
            F.silu(F.group_norm(xt, groups, gt, et))

    conv_fb = lambda: F.conv2d(xt, wt, bt, padding=1).backward(dyt)  # noqa: E731
    norm_fb = lambda: F.silu(F.group_norm(xt, groups, gt, et)).backward(dyt)  # noqa: E731
    return [cpu_ms(f, repeats) for f in (conv, conv_fb, norm, norm_fb)]


def gemm_rates(torch, m: int, k: int, n: int, repeats: int) -> tuple[float, float]:
    """GFLOP/s of one float32 (m, k) @ (k, n) product: np.matmul, and torch.matmul (nan without torch)."""
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    flops = 2 * m * k * n / 1e9
    ours = flops / cpu_ms(lambda: np.matmul(a, b, out=out), repeats) * 1000
    if torch is None:
        return ours, float("nan")
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out.copy())
    return ours, flops / cpu_ms(lambda: torch.matmul(ta, tb, out=tout), repeats) * 1000


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", help="whose levels (channels, groups) to time")
    p.add_argument("--image-size", type=int, default=32, help="S at the first level")
    p.add_argument("--batch", type=int, default=32, help="N (one shard of the bench's batch 64 on 2 cores)")
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)
    threadpool_limits(1)
    keep_freed_memory()
    try:
        import torch  # noqa: PLC0415  (optional: the comparison only)
        torch.set_num_threads(1)
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    config = get_preset(args.preset)
    groups = config.norm_num_groups
    print(f"{args.preset}, groupnorm groups {groups}; op (N, C, S, S): minidiff ms / torch ms (ratio); 1 thread, "
          f"CPU time, median of {args.repeats}")
    for level, C in enumerate(config.block_out_channels):
        S = args.image_size >> level
        x = rng.standard_normal((args.batch, C, S, S)).astype(np.float32)
        w = (rng.standard_normal((C, C, 3, 3)) / (3 * C**0.5)).astype(np.float32)
        b, beta = (rng.standard_normal(C).astype(np.float32) for _ in range(2))
        gamma = rng.uniform(0.5, 1.5, C).astype(np.float32)
        dy = rng.standard_normal(x.shape).astype(np.float32)
        ours = minidiff_ops(x, w, b, gamma, beta, dy, groups, args.repeats)
        theirs = torch_ops(torch, x, w, b, gamma, beta, dy, groups, args.repeats) if torch else [float("nan")] * 4
        names = ("conv3x3 fwd", "conv3x3 fwd+bwd", "groupnorm+silu fwd", "groupnorm+silu fwd+bwd")
        for name, m, t in zip(names, ours, theirs):
            print(f"  {name:24s} ({args.batch}, {C:3d}, {S:2d}, {S:2d}): {m:7.2f} / {t:7.2f} ({m / t:.2f}x)")
    print("gemm (m, k) @ (k, n): np.matmul GFLOP/s / torch.matmul GFLOP/s (torch's speed-up)")
    for level, C in enumerate(config.block_out_channels):
        S = args.image_size >> level
        x = np.zeros((args.batch, C, S, S), np.float32)
        if choose_lowering(x, np.zeros((C, C, 3, 3), np.float32), 1, (1, 1, 1, 1)) == "winograd":
            tiles = ((S + 1) // 2) ** 2  # per sample
            chunk = max(1, min(args.batch, winograd.CHUNK_BYTES // (16 * 2 * C * tiles * 4)))  # samples per chunk
            conv_gemm = (chunk * tiles, C, C)
        else:
            n = chunks(x, 9 * C, S * S)[0].stop  # samples per im2col chunk
            conv_gemm = (C, 9 * C, n * S * S)
        for m, k, n in (conv_gemm, (C, C, S * S)):
            ours, theirs = gemm_rates(torch, m, k, n, args.repeats)
            print(f"  ({m:5d}, {k:4d}) @ ({k:4d}, {n:5d}): {ours:6.1f} / {theirs:6.1f} ({theirs / ours:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
