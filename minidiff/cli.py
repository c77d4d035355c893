"""The `minidiff` command: train, sample, eval, export, info (and python -m minidiff).

Flags of `train` and `sample` are generated from TrainConfig / SampleConfig (minidiff/training/config.py),
so each flag, its type and its default are written once, next to a comment saying what it does.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np

from .fast.cpu.allocator import keep_freed_memory
from .backend import check_tf32, set_tf32
from .cli_checks import (MAX_SAMPLES, MAX_TRAIN_TIMESTEPS, check_eval_flags, check_model_flags,  # noqa: F401
                         check_sample_flags, load_noise)
from .cli_errors import EXIT_CODES, OneLineParser, check_can_create, classify_error, os_error_line  # noqa: F401
from .files import write_atomic
from .nn.ops import REFERENCE
from .training.config import (SCHEDULER_FLAGS, SHARD_MODES, SampleConfig, TrainConfig, add_dataclass_args,
                           check_shards, dataclass_from_args, finite_float, resolve_device, validate_sample_config,
                           validate_train_config)


def choose_ops(reference: bool, threads: int, shards: str, device: str):
    """The ops table of a command: REFERENCE with --reference, else the fast table with the batch in
    --threads shards (0: one per core, at most 4; one on a GPU) run in --shards."""
    from .fast.cpu.shards import resolve_workers
    from .fast.ops import fast_ops

    workers, shards = resolve_workers(threads, device), check_shards(shards)
    return REFERENCE if reference else fast_ops(workers, shards)


def cmd_train(args) -> int:
    """`minidiff train`: build a TrainConfig from the flags and run (or resume) training."""
    from .training.trainer import train

    cfg = dataclass_from_args(TrainConfig, args)
    validate_train_config(cfg)  # before choosing the ops: each bad flag one line naming it
    check_model_flags(cfg)  # before the run folder is made: a bad preset or schedule leaves nothing behind
    cfg.device = resolve_device(cfg.device)
    if cfg.resume and cfg.threads == 0:  # auto: keep the shard count the checkpoint records (it decides the bits)
        from .training.run_folder import recorded_shards

        cfg.threads = recorded_shards(cfg.out)  # 0 (auto) when none is recorded
    train(cfg, ops=choose_ops(cfg.reference, cfg.threads, cfg.shards, cfg.device))
    return 0


def cmd_train_classifier(args) -> int:
    """`minidiff train-classifier`: train_classifier with the fast table (its parameters in one flat buffer)."""
    from .fast.ops import fast_ops
    from .training.classifier import ClassifierTrainConfig, train_classifier

    cfg = dataclass_from_args(ClassifierTrainConfig, args)
    check_model_flags(cfg)
    train_classifier(cfg, ops=fast_ops())
    return 0


def _conditions(bundle, cfg: SampleConfig):
    """(host condition array, labels for the grid) for `minidiff sample`."""
    n = cfg.n
    if bundle.conditioning == "text" and cfg.class_id >= 0:
        raise ValueError("this model is text-conditioned: name the class in --prompt instead of --class")
    if bundle.conditioning == "class" and cfg.prompt:
        raise ValueError("this model is class-conditioned: use --class ID instead of --prompt")
    if bundle.conditioning == "text":
        prompts = [p.strip() for p in cfg.prompt.split(";")] if cfg.prompt else bundle.default_prompts(n)
        prompts = [prompts[i % len(prompts)] for i in range(n)]
        return bundle.encode(prompts=prompts), prompts
    if bundle.conditioning == "class":
        if cfg.class_id >= bundle.num_classes:
            raise ValueError(f"--class {cfg.class_id} is not a class of this model: use -1 (every class) or an id "
                             f"in 0..{bundle.num_classes - 1}")
        ids = [cfg.class_id] * n if cfg.class_id >= 0 else bundle.default_prompts(n)
        names = bundle.class_names or [str(i) for i in range(bundle.num_classes)]
        cond = bundle.encode(class_ids=ids, n=n)
        return cond, [names[i] for i in ids]
    if cfg.prompt or (cfg.class_id >= 0 and not cfg.classifier):
        raise ValueError("this model is unconditional: drop --prompt, and use --class only with --classifier")
    return None, None


def cmd_sample(args) -> int:
    """`minidiff sample`: load a run or a diffusers folder, draw n images with guidance, write a PNG grid, an .npz."""
    from .training.bundle import load_bundle
    from .training.report import ProgressBar, save_grid
    from .training.generate import generate
    from .training.sample_files import default_out_dir, sample_stem, unused_stem

    cfg = dataclass_from_args(SampleConfig, args)
    validate_sample_config(cfg)
    check_sample_flags(cfg)
    cfg.device = resolve_device(cfg.device)
    if check_tf32(cfg.tf32, cfg.device, cfg.dtype):
        set_tf32(True)
    noise = load_noise(cfg.noise) if cfg.noise else None
    scheduler = {k: getattr(cfg, k) for k in SCHEDULER_FLAGS if getattr(cfg, k)}  # the flags given
    bundle = load_bundle(cfg.checkpoint, use_ema=not cfg.no_ema, device=cfg.device, dtype=cfg.dtype,
                         scheduler=scheduler)
    bundle.ops = choose_ops(cfg.reference, cfg.threads, cfg.shards, cfg.device)
    cond, labels = _conditions(bundle, cfg)
    grad_fn = None
    if cfg.classifier:
        from .training.classifier import load_classifier

        clf = load_classifier(cfg.classifier, device=cfg.device, dtype=cfg.dtype)
        targets = clf.targets_for(bundle, cond, labels, cfg)
        grad_fn = clf.make_grad_fn(targets)
    out = Path(cfg.out) if cfg.out else default_out_dir(cfg.checkpoint)  # default: RUN/samples
    check_can_create(out)  # fail before sampling, but make the folder only when there is something to write
    bar = ProgressBar(cfg.steps, unit="step")
    x = generate(bundle, cond, cfg.n, cfg.guidance_scale, cfg.sampler, cfg.steps, cfg.eta, cfg.seed,
                 cfg.guidance_rescale, grad_fn, cfg.classifier_scale, cfg.device, cfg.dtype, karras=cfg.karras,
                 callback=lambda i, t, x, x0: bar.update(i + 1, 1), noise=noise,
                 use_clipped_model_output=cfg.use_clipped_model_output)
    bar.close()
    from .backend import to_numpy

    if not np.isfinite(to_numpy(x)).all():
        raise RuntimeError(f"the model at {cfg.checkpoint} gave non-finite pixels (a diverged run); nothing was "
                           "written. Use an earlier checkpoint or train again with a lower --lr or --grad-clip")

    out.mkdir(parents=True, exist_ok=True)
    stem = unused_stem(out, sample_stem(cfg, bundle.conditioning, labels))  # never overwrites a file
    given = {"labels": np.asarray(cond, np.int64)} if bundle.conditioning == "class" else {}
    given = {"prompts": np.array(labels)} if bundle.conditioning == "text" else given
    write_atomic(out / f"{stem}.png", lambda f: save_grid(x, f, labels=labels, ncol=9))
    write_atomic(out / f"{stem}.npz", lambda f: np.savez(f, images=to_numpy(x), **given))
    print(f"wrote {cfg.n} samples to {out / (stem + '.png')} and {out / (stem + '.npz')}")
    return 0


def cmd_export(args) -> int:
    """`minidiff export`: a run as a diffusers pipeline folder (training/export.py)."""
    from .training.export import export_pipeline

    if not Path(args.out).is_file():  # (an existing file: export_pipeline's own refusal, exit 2)
        check_can_create(Path(args.out))  # before reading the run: an --out nobody may write is one line naming it
    out = export_pipeline(args.checkpoint, args.out, use_ema=not args.no_ema, force=args.force)
    print(f"wrote the diffusers pipeline {out} (model_index.json, unet/, scheduler/, minidiff.json); load it with "
          f"DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


def cmd_eval(args) -> int:
    """`minidiff eval`: prompt accuracy at each guidance scale (evaluate.py: shapes; eval_labelled.py: other labelled
    data, with a Frechet distance); with --nll, bits/dim (nll.py)."""
    from .evaluate import evaluate

    check_eval_flags(args)
    if check_tf32(args.tf32, args.device, args.dtype):
        set_tf32(True)
    if args.nll:
        from .nll import evaluate_nll

        evaluate_nll(args.checkpoint, data=args.data, n=args.n, batch_size=args.batch_size,
                     timesteps=args.nll_timesteps, seed=args.seed, device=args.device, dtype=args.dtype, out=args.out,
                     threads=args.threads, shards=args.shards, reference=args.reference)
        return 0
    from .eval_labelled import evaluate_labelled, is_shapes_run

    if not is_shapes_run(args.checkpoint):  # any labelled data: classifier accuracy and Frechet distance
        evaluate_labelled(args.checkpoint, n_per_class=args.n_per_class, scales=args.scales, steps=args.steps,
                          sampler=args.sampler, karras=args.karras, seed=args.seed, device=args.device,
                          dtype=args.dtype, out=args.out, threads=args.threads, shards=args.shards,
                          reference=args.reference, eval_classifier=args.eval_classifier)
        return 0
    evaluate(args.checkpoint, n_per_class=args.n_per_class, scales=args.scales, steps=args.steps,
             sampler=args.sampler, karras=args.karras, seed=args.seed, device=args.device, dtype=args.dtype,
             out=args.out,
             threads=args.threads, shards=args.shards, reference=args.reference)
    return 0


def cmd_info(args) -> int:
    """`minidiff info`: version, GPU availability and the presets' parameter counts."""
    from . import __version__
    from .backend import gpu_available
    from .model.unet import print_param_counts

    print(f"minidiff {__version__}, numpy {np.__version__}, GPU (CuPy) available: {gpu_available()}")
    print("U-Net presets (parameters):")
    print_param_counts()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `minidiff` argument parser with every subcommand."""
    p = OneLineParser(prog="minidiff", description=__doc__.splitlines()[0], epilog=EXIT_CODES,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a diffusion model (default: the built-in shapes data)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(t, TrainConfig)
    t.set_defaults(func=cmd_train)
    from .training.classifier import add_classifier_parser

    add_classifier_parser(sub).set_defaults(func=cmd_train_classifier)
    s = sub.add_parser("sample", help="sample a PNG grid from a trained model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_args(s, SampleConfig, renames={"class_id": "--class"})
    s.set_defaults(func=cmd_sample)
    e = sub.add_parser("eval", help="samples' prompt accuracy (built-in shapes: pixel checker; other labelled data: "
                       "a clean-data classifier's accuracy and Frechet distance); --nll: bits/dim",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="a run directory, a checkpoint .npz or a diffusers folder")
    e.add_argument("--n-per-class", type=int, default=10, help="samples per class at each guidance scale")
    e.add_argument("--scales", type=finite_float, nargs="+", default=[0.0, 1.0, 3.0], help="guidance scales s to evaluate")
    e.add_argument("--steps", type=int, default=50, help="number of inference steps")
    from .diffusion.sampler import SAMPLERS

    e.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="the sampler")
    e.add_argument("--karras", action="store_true", help="Karras et al. (2022) sigmas (rho = 7) for euler, euler_a, "
                   "heun, dpm++2m (not ddpm / ddim)")
    e.add_argument("--seed", type=int, default=1, help="seed of the initial noise and of any sampling noise")
    e.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="cpu, or gpu (CuPy)")
    e.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="floating-point type")
    e.add_argument("--threads", type=int, default=0, help="CPU threads, each samples a shard of the batch; "
                   "0 = one per core (at most 4)")
    e.add_argument("--shards", default="processes", choices=SHARD_MODES,
                   help="where the CPU shards run: processes (each its own GIL; faster) or threads; the same numbers")
    e.add_argument("--reference", action="store_true",
                   help="run the readable reference ops (nn/) instead of the fast ones; slower, same numbers up to "
                        "rounding")
    e.add_argument("--tf32", action="store_true",
                   help="GPU float32 matmuls in TF32 on the tensor cores (faster, ~1e-3 relative error)")
    e.add_argument("--out", default="", help="write eval.json and a grid per scale here (default: the run dir)")
    e.add_argument("--eval-classifier", default="", help="labelled data: the folder of the eval classifier (trained "
                   "there once on the clean data; share one folder to compare runs); '' = RUN/eval_classifier")
    e.add_argument("--nll", action="store_true", help="instead: bits/dim of held-out data by the variational bound "
                   "(writes nll.json); --n images, --data, --batch-size, --nll-timesteps")
    e.add_argument("--n", type=int, default=64, help="--nll: images to score")
    e.add_argument("--data", default="", help="--nll: the data (default: the run's; shapes are drawn from --seed)")
    e.add_argument("--batch-size", type=int, default=64, help="--nll: images per model call")
    e.add_argument("--nll-timesteps", type=int, default=0,
                   help="--nll: 0 = all T terms (the bound); K < T = a strided estimate over K timesteps")
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write a run as a diffusers pipeline folder (DDPMPipeline.from_pretrained)")
    x.add_argument("--checkpoint", required=True, help="a run directory or a checkpoint .npz")
    x.add_argument("--out", required=True, help="the pipeline folder to write (model_index.json, unet/, scheduler/)")
    x.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA ones")
    x.add_argument("--force", action="store_true", help="replace an earlier export at --out")
    x.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    x.set_defaults(func=cmd_export)
    i = sub.add_parser("info", help="version, GPU availability and parameter counts of the presets")
    i.set_defaults(func=cmd_info)
    from .bench import add_bench_parser
    from .fixtures import add_fixtures_parser
    from .oracle import add_oracle_parser

    add_bench_parser(sub)
    add_fixtures_parser(sub)
    add_oracle_parser(sub)
    p.description = f"{__doc__.splitlines()[0].split(':')[0]}: {', '.join(sub.choices)}"  # every command
    return p


def main(argv=None) -> int:
    """Run one subcommand; every expected failure is one error line and an exit status from EXIT_CODES."""
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # this process's malloc keeps what a step frees for the next (allocator.py)
    with warnings.catch_warnings(record=True) as caught:  # held back: nothing is printed before an error line
        code = _run(args)
    if code == 0:  # a run that succeeded shows its warnings (each once), after its own output
        for w in {(w.category.__name__, str(w.message)): w for w in caught}.values():
            print(f"minidiff {args.command}: warning: {w.category.__name__}: {' '.join(str(w.message).split())}",
                  file=sys.stderr)
    return code


def _run(args) -> int:
    """args.func(args), every expected failure turned into one error line and its exit status."""
    try:
        if isinstance(getattr(args, "seed", None), int) and args.seed < 0:  # every command's: NumPy's seeds are >= 0
            raise ValueError(f"--seed must be >= 0, got {args.seed}")
        return args.func(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        if args.command == "train" and out and not (Path(out).expanduser() / "checkpoints" / "latest.npz").exists():
            print("\ninterrupted before the first checkpoint; start again with the same command", file=sys.stderr)
        else:
            print("\ninterrupted; the latest checkpoint is kept (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # sorted by classify_error; anything else (a bug) keeps its traceback
        known = classify_error(err)
        if known is None:
            raise
        code, msg = known
        print(f"minidiff {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return code
