"""`minidiff eval`: how often a sample shows the prompted shape and color (built-in shapes data).

    accuracy(s) = (1 / N) sum_n [check(x_n) == (shape_n, color_n)],   x_n ~ p_s(x | prompt_n)

where p_s is the sampler with classifier-free guidance scale s and `check` is the deterministic
pixel checker of data/shapes.py (independent of the network). Every class is prompted equally often.
Shape legend: N = n_per_class * 9 samples, C = 3 channels, S image side.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .fast.cpu.shards import resolve_workers
from .fast.ops import fast_ops
from .nn.ops import REFERENCE
from .training.bundle import load_bundle, resolve_checkpoint
from .training.pipelines import is_diffusers_folder
from .data import shapes
from .files import write_atomic
from .training.report import save_grid
from .training.generate import generate


def evaluate(checkpoint, n_per_class: int = 10, scales=(0.0, 1.0, 3.0), steps: int = 50, sampler: str = "ddim",
             seed: int = 1, device: str = "cpu", dtype: str = "float32", out: str = "", threads: int = 0,
             shards: str = "threads", reference: bool = False, log=print, karras: bool = False) -> dict:
    """Sample n_per_class images per class at each guidance scale; return {scale: accuracy}.

    The fast ops with the batch in `threads` shards run in `shards`, or the reference ops (reference=True)."""
    if n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1, got {n_per_class}")
    bundle = load_bundle(checkpoint, device=device, dtype=dtype)
    bundle.ops = REFERENCE if reference else fast_ops(resolve_workers(threads, device), shards)
    if bundle.conditioning == "none" or list(bundle.class_names or []) != list(shapes.CLASS_NAMES):
        raise ValueError("eval needs a class- or text-conditioned model trained on the built-in shapes data "
                         "(--data shapes16 or shapes32)")
    n = n_per_class * shapes.NUM_CLASSES
    class_ids = [i % shapes.NUM_CLASSES for i in range(n)]
    prompts = [shapes.CLASS_NAMES[i] for i in class_ids]
    cond = bundle.encode(prompts=prompts, class_ids=class_ids, n=n)
    default = Path(checkpoint) if is_diffusers_folder(checkpoint) else resolve_checkpoint(checkpoint).parent.parent
    out_dir = Path(out) if out else default  # a run's folder, or an exported pipeline's
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint), "n": n, "sampler": sampler, "karras": karras, "steps": steps, "seed": seed,
              "accuracy": {}, "seconds": {}}
    for s in scales:
        t0 = time.perf_counter()
        x = generate(bundle, cond, n, float(s), sampler, steps, seed=seed, device=device, dtype=dtype, karras=karras)
        acc = shapes.prompt_accuracy(x, prompts)
        dt = time.perf_counter() - t0
        result["accuracy"][f"{s:g}"] = acc
        result["seconds"][f"{s:g}"] = round(dt, 1)
        write_atomic(out_dir / f"eval_s{s:g}.png",
                     lambda f: save_grid(x[: 2 * shapes.NUM_CLASSES], f, labels=prompts, ncol=9))
        name = sampler + (" karras" if karras else "")
        log(f"guidance scale {s:g}: accuracy {acc:.1%} over {n} samples ({name} {steps} steps, {dt:.0f}s)")
    write_atomic(out_dir / "eval.json", json.dumps(result, indent=2).encode())
    log(f"wrote {out_dir / 'eval.json'} and eval_s*.png")
    return result
