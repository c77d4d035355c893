"""`minidiff bench`: time one training step and one sampling step of a U-Net preset, beside
diffusers' UNet2DModel in PyTorch eager on the same network, weights, inputs and threads.

    train step  = ops.map_batch(loss_and_grads) (add_noise + unet_forward + diffusion_loss + unet_backward)
                  + AdamW.step, as Trainer.train_step runs them
                  (torch: model(x_t, t) + F.mse_loss + loss.backward() + torch.optim.AdamW.step)
    sample step = ops.map_forward(model_output) (unet_forward, no grad) + ops.ddim_step, 50-step DDIM at
                  t = 500 -> 480 (torch: torch.no_grad() model(x_t, t) + diffusers DDIMScheduler.step)

minidiff runs the fast ops table (fast/ops.py: fast_ops(--threads, --shards)), as `minidiff train`
does by default; --reference times the readable reference ops (nn/) instead.

Each time is the median over --repeats after --warmup untimed steps, and every timed region ends
with a device synchronization (backend.synchronize, torch.cuda.synchronize). The two sides run in
the same process one after the other, each after its own warm-up: alternating them step by step
made their thread pools (OpenBLAS's, PyTorch's OpenMP) spin against each other on 2 cores.
--rounds R alternates them in blocks instead (minidiff, torch, minidiff, ...; each block
--warmup + --repeats steps), so that load that comes and goes on a shared machine falls on both
sides; the median is then over all R blocks (default 3), and the ratio of each round is printed too.
On the CPU it also prints the GEMM-limited time (bench_flops.py): the step's conv/linear/attention FLOPs
over np.matmul's rate on the network's GEMM shapes, measured in the same run, threads and clock, and
each side's time as a multiple of it.
On a shared machine elapsed time measures the neighbours too: --clock cpu with --threads 1 then
gives the CPU time each side needs, which load does not inflate.
Peak memory is the extra memory one step needs on top of the weights and optimizer state:
CPU minidiff: tracemalloc's peak (NumPy reports its buffers to tracemalloc; the shards run in
threads for it, since it cannot see worker processes); CPU torch: not
measured (PyTorch's CPU allocator is invisible to tracemalloc); GPU: the CuPy memory pool's
high-water mark / torch.cuda.max_memory_allocated.

PyTorch and diffusers are optional and never imported by minidiff/: the twin network lives in
scripts/bench_torch.py, which load_torch_side() loads from the source checkout (--no-torch, or
their absence, gives minidiff's numbers alone).

Shape legend: N batch, C image channels, S image side.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import numpy as np

from .bench_sides import LR, T_PREV, T_SAMPLE, MinidiffSide, load_torch_side, make_inputs  # noqa: F401  (re-exported)
from .fast.cpu.allocator import keep_freed_memory
from .bench_flops import gemm_limited, gemm_lines
from .bench_timing import COLUMNS, alternating_ms, cpu_peak_mb, format_rows, row, set_blas_threads  # noqa: F401
from .backend import BackendError, check_tf32, set_tf32, to_numpy, xp_for
from .training.config import SHARD_MODES, check_shards
from .fast.cpu.shards import resolve_workers
from .diffusion.schedule import make_schedule
from .model.unet import count_params, init_params, unet_forward
from .model.config import PRESETS, get_preset



def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `bench` subcommand on an argparse subparsers object; returns its parser."""
    b = subparsers.add_parser("bench", help="time a training and a sampling step, beside PyTorch eager",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)
    return b


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small", choices=sorted(PRESETS), help="U-Net preset")
    p.add_argument("--batch", type=int, default=64, help="batch size N")
    p.add_argument("--image-size", type=int, default=None, help="image side S (default: the preset's sample_size)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3,
                   help="time the two sides in this many alternating blocks (minidiff, torch, minidiff, ...), each "
                        "--warmup untimed then --repeats timed steps, so that load that comes and goes on a shared "
                        "machine falls on both; the median is over all the blocks' steps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both sides: torch.set_num_threads, and minidiff's batch in that many "
                        "shards, one thread each (default: one per core, at most 4)")
    p.add_argument("--shards", default="processes", choices=SHARD_MODES,
                   help="where minidiff's CPU shards run: worker processes (each its own GIL, as `minidiff train` "
                        "and `sample` run them by default) or threads; the same numbers")
    p.add_argument("--reference", action="store_true",
                   help="time minidiff's readable reference ops (nn/) instead of the fast ones (the default, as "
                        "`minidiff train` runs them)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: CPU time of the process (all its threads), for shared or busy "
                        "machines where elapsed time measures the neighbours; use it with --threads 1")
    p.add_argument("--tf32", action="store_true",
                   help="GPU float32 matmuls in TF32 on both sides (minidiff: cuBLAS compute type; torch: "
                        "allow_tf32 for cuBLAS and cuDNN); default off, so float32 means float32 on both")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch/diffusers comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory rows")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="", metavar="PATH", help="also write the rows (and the settings) here")


# ----------------------------------------------------------------------------- the run


def run_bench(preset="small", batch=64, image_size=None, device="cpu", dtype="float32", repeats=5, warmup=2,
              threads=None, use_torch=True, memory=True, seed=0, clock="wall", tf32=False, rounds=3,
              shards="processes", reference=False, log=print) -> list[dict]:
    """Time both steps on both sides; return one dict per measurement (the printed rows)."""
    for name, value, low in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0),
                             ("threads", 1 if threads is None else threads, 1), ("rounds", rounds, 1)):
        if value < low:
            raise ValueError(f"--{name} must be an integer >= {low}, got {value}")
    if clock not in ("wall", "cpu") or (clock == "cpu" and device != "cpu"):
        raise ValueError(f"--clock must be 'wall' or 'cpu' ('cpu' measures host CPU time: --device cpu only), "
                         f"got --clock {clock} with --device {device}")
    base = get_preset(preset)
    size = base.sample_size if image_size is None else image_size
    levels = len(base.block_out_channels)
    if size < 1 or size % 2 ** (levels - 1):
        raise ValueError(f"--image-size must be a multiple of {2 ** (levels - 1)} for preset {preset!r} "
                         f"({levels} resolutions), got {size}")
    config = dataclasses.replace(base, sample_size=size)
    check_shards(shards)
    xp_for(device)  # BackendError with the install hint when the GPU is missing
    if check_tf32(tf32, device, dtype):
        set_tf32(True)
    make_torch_side = load_torch_side() if use_torch else None
    if device == "cpu" and threads is None:  # both sides get the same: one thread per core, at most 4
        threads = resolve_workers(0, device)
    notes = [set_blas_threads(threads)] if device == "cpu" else []
    if use_torch and make_torch_side is None:
        notes.append("torch side skipped: scripts/bench_torch.py not found (run from a source checkout)")
    schedule = make_schedule(1000, "linear")
    host_params = init_params(config, seed=seed, dtype=np.dtype(dtype))
    inputs = make_inputs(config, batch, size, np.dtype(dtype), seed, schedule)
    workers = resolve_workers(threads or 0, device)  # CPU: the batch in `threads` shards, one thread each
    if clock == "cpu" and workers > 1 and shards == "processes":
        raise ValueError("--clock cpu measures this process's CPU time, not its worker processes': use it with "
                         "--threads 1 (or --shards threads)")
    md = MinidiffSide(config, host_params, inputs, device, schedule, workers, shards, reference)
    th = None
    if make_torch_side is not None:
        th = make_torch_side(config, host_params, inputs, device, dtype, notes.append, threads, tf32)
    if th is not None:  # the same network: compare one forward before timing anything
        eps_md = to_numpy(unet_forward(md.params, config, md.x_s, md.t_s, ops=md.ops)[0])
        eps_th = th.forward_eval()
        rel = float(np.abs(eps_md - eps_th).max() / max(np.abs(eps_th).max(), 1e-30))
        notes.append(f"same network check: max|eps_minidiff - eps_torch| / max|eps_torch| = {rel:.1e}")
    log(f"minidiff bench: preset {preset} ({count_params(config):,} params), {size}x{size}, batch {batch}, "
        f"{device} {dtype}{' (TF32 matmuls)' * tf32}, median of {repeats} after {warmup} warm-up"
        f"{f' in each of {rounds} alternating rounds' * (rounds > 1)}, {clock} clock, "
        + ("minidiff's reference ops, in 1 thread" if reference else
           f"minidiff's batch in {workers} shards, in {shards}" if workers > 1 else "minidiff in 1 thread"))
    for n in notes:
        log("  " + n)
    sides = [md] + ([th] if th is not None else [])
    timer = time.process_time if clock == "cpu" else time.perf_counter
    rows = []
    for what, step in (("train step (ms)", "train_step"), ("sample step (ms)", "sample_step")):
        times = alternating_ms(sides, step, warmup, repeats, rounds, timer)  # [side][round][repeat]
        ms = [statistics.median(t for block in side for t in block) for side in times]
        rows.append(row(what, device, preset, batch, ms[0], ms[1] if th else None))
        rows[-1]["rounds_ms"] = [[statistics.median(block) for block in side] for side in times]  # [side][round]
        if rounds > 1 and th is not None:
            log(f"  {what[:-5]} ratio in each round: " + " ".join(
                f"{a / b:.2f}" for a, b in zip(*rows[-1]["rounds_ms"])))
    if device == "cpu":  # the matmuls' FLOPs at np.matmul's rate on their shapes, measured now (bench_flops.py)
        limit = gemm_limited(config, batch, size, np.dtype(dtype), timer)
        for r, key in zip(rows, ("train", "sample")):
            r.update(flops=limit[f"{key}_flops"], gemm_gflops=limit["gemm_gflops"], gemm_limited_ms=limit[f"{key}_ms"],
                     square_gemm_gflops=limit["square_gflops"], square_gemm_limited_ms=limit[f"square_{key}_ms"])
        for line in gemm_lines(limit, rows):
            log(line)
    if memory:
        for what, step in (("train peak memory (MB)", "train_step"), ("sample peak memory (MB)", "sample_step")):
            mbs = [s.peak_mb(getattr(s, step)) for s in sides]
            rows.append(row(what, device, preset, batch, mbs[0], mbs[1] if th else None))
    for r in rows:
        r.update(image_size=size, dtype=dtype, repeats=repeats, warmup=warmup, rounds=rounds, threads=threads,
                 clock=clock)
    return rows


def cmd_bench(args) -> int:
    rows = run_bench(args.preset, args.batch, args.image_size, args.device, args.dtype, args.repeats,
                     args.warmup, args.threads, not args.no_torch, not args.no_memory, args.seed, args.clock,
                     args.tf32, args.rounds, args.shards, args.reference)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(sys.argv), "rows": rows}, f, indent=2)
        print(f"wrote {len(rows)} rows to {args.json}")
    return 0


def main(argv=None) -> int:
    """Standalone entry point (scripts/bench.py): same flags as `minidiff bench`."""
    p = argparse.ArgumentParser(prog="bench", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_bench_args(p)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the CLI does: both sides of the comparison run in this one process
    try:
        return cmd_bench(args)
    except (ValueError, BackendError) as err:
        print(f"minidiff bench: error: {err}", file=sys.stderr)
        return 2
