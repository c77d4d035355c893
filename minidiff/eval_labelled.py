"""`minidiff eval` on any labelled data (an .npz with labels, class subfolders, MNIST, CIFAR-10): per guidance
scale s, how often a clean-data classifier reads each sample as its prompted class, and the Fréchet distance
of the samples to held-out real images in that classifier's feature space (training/eval_classifier.py).

    accuracy(s) = 1/M sum_m [argmax classifier(x_m, t = 0) == y_m],   x_m ~ p_s(x | y_m)
    frechet(s)  = ||mu_H - mu_x||^2 + Tr(S_H + S_x - 2 (S_H S_x)^{1/2})   (pooled classifier features)

The built-in shapes keep their pixel checker (evaluate.py). Shape legend: M = n_per_class * K samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from .data import BUILTIN, load_dataset
from .fast.cpu.shards import resolve_workers
from .fast.ops import fast_ops
from .nn.ops import REFERENCE
from .training.bundle import load_bundle, load_run, resolve_checkpoint
from .training.eval_classifier import get_eval_classifier, sample_and_score
from .training.pipelines import is_diffusers_folder
from .files import write_atomic
from .training.report import save_grid
from .training.trainer import IN_MEMORY


def is_shapes_run(checkpoint) -> bool:
    """True for a run on the built-in shapes (and for a diffusers folder, which evaluate.py checks itself)."""
    if is_diffusers_folder(checkpoint):
        return True
    return load_run(checkpoint)[1]["train_config"].get("data") in BUILTIN


def evaluate_labelled(checkpoint, n_per_class: int = 10, scales=(0.0, 1.0, 3.0), steps: int = 50,
                      sampler: str = "ddim", seed: int = 1, device: str = "cpu", dtype: str = "float32", out: str = "",
                      threads: int = 0, shards: str = "threads", reference: bool = False, karras: bool = False,
                      eval_classifier: str = "", data=None, log=print) -> dict:
    """Sample n_per_class images per class at each scale; return and write eval.json {accuracy, frechet, ...}.

    data: the run's training data (default: its --data, at its --resolution, center crop), or a path or a
    dataset; eval_classifier: the classifier's folder (default RUN/eval_classifier), trained there once."""
    if n_per_class < 1:
        raise ValueError(f"--n-per-class must be >= 1, got {n_per_class}")
    bundle = load_bundle(checkpoint, device=device, dtype=dtype)
    bundle.ops = REFERENCE if reference else fast_ops(resolve_workers(threads, device), shards)
    run_dir = resolve_checkpoint(checkpoint).parent.parent
    tc = load_run(checkpoint)[1]["train_config"]
    if data is None and tc["data"] == IN_MEMORY:
        raise ValueError("this run was trained on in-memory arrays: pass data= (the same arrays) to evaluate it")
    spec = tc["data"] if data is None else data
    dataset = spec if hasattr(spec, "batch") else load_dataset(spec, None if tc.get("resolution", -1) == -1
                                                                else tc["resolution"])
    clf = get_eval_classifier(dataset, Path(eval_classifier) if eval_classifier else run_dir / "eval_classifier",
                              log=log)
    out_dir = Path(out) if out else run_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"checkpoint": str(checkpoint), "n": n_per_class * len(clf.class_names), "sampler": sampler,
              "karras": karras, "steps": steps, "seed": seed, "classifier": str(eval_classifier or
                                                                                run_dir / "eval_classifier"),
              "classifier_data": clf.meta["key"]["data"], "heldout_n": clf.meta["heldout_n"],
              "heldout_accuracy": clf.meta["heldout_accuracy"], "accuracy": {}, "frechet": {}, "seconds": {}}
    log(f"eval classifier reads {clf.meta['heldout_accuracy']:.1%} of {clf.meta['heldout_n']} held-out real images")
    for s in scales:
        t0 = time.perf_counter()
        score, x, ids = sample_and_score(bundle, clf, n_per_class, s, sampler, steps, seed, device, dtype, karras)
        dt = time.perf_counter() - t0
        key = f"{s:g}"
        result["accuracy"][key], result["frechet"][key] = score["accuracy"], score["frechet"]
        result["seconds"][key] = round(dt, 1)
        K = len(clf.class_names)
        names = [clf.class_names[i] for i in ids[: 2 * K]]
        write_atomic(out_dir / f"eval_s{key}.png",
                     lambda f: save_grid(x[: 2 * K], f, labels=names, ncol=min(K, 10)))
        log(f"guidance scale {key}: accuracy {score['accuracy']:.1%}, Frechet distance {score['frechet']:.4g} over "
            f"{len(ids)} samples ({sampler} {steps} steps, {dt:.0f}s)")
    write_atomic(out_dir / "eval.json", json.dumps(result, indent=2).encode())
    log(f"wrote {out_dir / 'eval.json'} and eval_s*.png")
    return result
