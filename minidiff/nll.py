"""`minidiff eval --nll`: bits/dim of 8-bit data under a trained run, by the variational bound (vlb.py).

    NLL(x_0) <= L_T + sum_{t=0}^{T-1} L_t   in bits/dim,   mean over n held-out images   (DDPM: 3.70 on CIFAR-10)

Each image gets one noise draw per t (improved-diffusion's calc_bpd_loop, as scripts/image_nll.py runs it,
x0^ clipped to [-1, 1]). With --nll-timesteps K < T the sum over t is a strided estimate (vlb.bound_weights:
each evaluated L_t stands for the t's since the previous one), not a bound. Held-out data: the built-in
shapes are drawn fresh from --seed (training drew from its own seed); a fixed set (--data PATH, e.g. a
held-out .npz) is read in order, its first n images. Conditional models are scored given the images'
own labels or captions: the bound is then on -log p(x_0 | c).
Shape legend: N images per batch, C channels, S image side, K evaluated timesteps.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from .backend import to_numpy, xp_for
from .files import write_atomic
from .data import load_dataset
from .diffusion.likelihood import check_8bit
from .diffusion.vlb import VLB_VARIANCE_TYPES, calc_bpd_loop, strided_timesteps
from .fast.cpu.shards import resolve_workers
from .fast.ops import fast_ops
from .nn.ops import REFERENCE
from .training.bundle import load_bundle, load_run, resolve_checkpoint
from .training.pipelines import is_diffusers_folder


def held_out_images(dataset, n: int, seed: int):
    """(x float32 (n, C, S, S), labels (n,) or None, captions or None): fresh shapes from seed, or the first n
    images of a fixed set."""
    if dataset.infinite:
        return dataset.batch(np.random.default_rng(seed), n)
    n = min(n, len(dataset))
    labels = None if dataset.labels is None else dataset.labels[:n]
    captions = None if dataset.captions is None else list(dataset.captions[:n])
    return dataset.images[:n], labels, captions


def evaluate_nll(checkpoint, data: str = "", n: int = 64, batch_size: int = 64, timesteps: int = 0, seed: int = 1,
                 device: str = "cpu", dtype: str = "float32", out: str = "", threads: int = 0,
                 shards: str = "threads", reference: bool = False, clip_denoised: bool = True, log=print) -> dict:
    """Bits/dim of n images under the run's EMA model; writes nll.json beside the run (or in out).

    timesteps 0: all T terms (the bound); K in [2, T): the strided estimate. Returns the summary dict."""
    if n < 1 or batch_size < 1:
        raise ValueError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    bundle = load_bundle(checkpoint, device=device, dtype=dtype)  # a run, or a diffusers folder
    bundle.ops = REFERENCE if reference else fast_ops(resolve_workers(threads, device), shards)
    variance_type = bundle.sampler_options.get("variance_type", "fixed_small").removesuffix("_log")
    if variance_type not in VLB_VARIANCE_TYPES:
        raise ValueError(f"the model's variance_type {variance_type!r} has no bound here; known: {VLB_VARIANCE_TYPES}")
    if not data:
        if is_diffusers_folder(checkpoint):
            raise ValueError(f"{checkpoint} is a diffusers folder: name the data to score with --data")
        data = load_run(checkpoint)[1]["train_config"]["data"]
    dataset = load_dataset(data)
    if (dataset.channels, dataset.image_size) != (bundle.config.in_channels, bundle.config.sample_size):
        raise ValueError(f"data {data if isinstance(data, str) else dataset.name!r} has {dataset.channels} channels "
                         f"of {dataset.image_size}x{dataset.image_size}; the model takes {bundle.config.in_channels} "
                         f"of {bundle.config.sample_size}x{bundle.config.sample_size} (pass --data of that size)")
    T = bundle.schedule.num_train_timesteps
    ts = None if timesteps in (0, T) else strided_timesteps(T, timesteps)
    x, labels, captions = held_out_images(dataset, n, seed)
    check_8bit(x)                              # the decoder's data: the loaders give 8-bit levels in [-1, 1]
    xp = xp_for(device)
    totals, priors, terms = [], [], []
    t0 = time.perf_counter()
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        cond = None
        if bundle.conditioning == "class":
            cond = bundle.encode(class_ids=labels[start:stop], n=stop - start)
        elif bundle.conditioning == "text":
            cond = bundle.encode(prompts=captions[start:stop])
        cond = None if cond is None else xp.asarray(cond)
        x0 = xp.asarray(x[start:stop], dtype=np.dtype(dtype))
        res = calc_bpd_loop(bundle.model_fn, bundle.schedule, x0, cond, variance_type, bundle.prediction_type,
                            clip_denoised, seed=seed + start, timesteps=ts)
        totals.append(to_numpy(res["total_bpd"]).astype(np.float64))
        priors.append(to_numpy(res["prior_bpd"]).astype(np.float64))
        terms.append(to_numpy(res["vb"]).astype(np.float64))
        log(f"  images {stop}/{len(x)}: bits/dim so far {np.concatenate(totals).mean():.4f}")
    total, prior, vb = np.concatenate(totals), np.concatenate(priors), np.concatenate(terms)
    kind = "bound (all T timesteps)" if ts is None else f"strided estimate ({len(ts)} of {T} timesteps)"
    summary = {"checkpoint": str(checkpoint), "data": dataset.name, "n": int(len(total)), "variance_type": variance_type,
               "kind": kind, "bits_per_dim": float(total.mean()),
               "standard_error": float(total.std(ddof=1) / math.sqrt(len(total))) if len(total) > 1 else None,
               "prior_bpd": float(prior.mean()), "decoder_bpd": float(vb[:, -1].mean()),
               "timesteps": res["timesteps"].tolist(), "vb_per_t": vb.mean(0).tolist(),
               "seconds": round(time.perf_counter() - t0, 1)}
    out_dir = Path(out) if out else Path(checkpoint) if is_diffusers_folder(checkpoint) else \
        resolve_checkpoint(checkpoint).parent.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "nll.json", json.dumps(summary, indent=2).encode())
    se = f" +- {summary['standard_error']:.4f}" if summary["standard_error"] is not None else ""
    log(f"bits/dim {summary['bits_per_dim']:.4f}{se} over {summary['n']} images of {dataset.name} "
        f"({variance_type}; {kind}; L_T {summary['prior_bpd']:.2e}, L_0 {summary['decoder_bpd']:.3f}); "
        f"wrote {out_dir / 'nll.json'}")
    return summary
