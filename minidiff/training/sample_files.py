"""Where `minidiff sample` writes, and under which name: every setting that changes the picture is in the
name, and an existing file is never overwritten (a -2, -3, ... suffix is added instead).

    samples_<sampler>[_karras]<steps>_eta<eta>_s<scale>[_r<rescale>]_<condition>_seed<seed>_n<n>
            [_cls<classifier scale>-<classifier file hash>][_raw][_noclip][_noise<hash>][_<dtype>].png / .npz

<condition> is class<id> or classes (each class in turn) for class models, p<8 hex digits of the prompts'
SHA-1> for text models, uncond otherwise.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _h(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def condition_tag(conditioning: str, class_id: int, prompts) -> str:
    """class<id> / classes / p<hash of the prompts> / uncond."""
    if conditioning == "class":
        return f"class{class_id}" if class_id >= 0 else "classes"
    if conditioning == "text":
        return "p" + _h(";".join(prompts or []))
    return f"class{class_id}" if class_id >= 0 else "uncond"  # an unconditional model with --classifier --class


def sample_stem(cfg, conditioning: str, prompts=None) -> str:
    """The file stem for SampleConfig cfg (see the module docstring)."""
    sampler = cfg.sampler + ("_karras" if cfg.karras else "")
    stem = f"samples_{sampler}{cfg.steps}_eta{cfg.eta:g}_s{cfg.guidance_scale:g}"
    if cfg.guidance_rescale:
        stem += f"_r{cfg.guidance_rescale:g}"
    stem += f"_{condition_tag(conditioning, cfg.class_id, prompts)}_seed{cfg.seed}_n{cfg.n}"
    if cfg.classifier and cfg.classifier_scale:
        stem += f"_cls{cfg.classifier_scale:g}-{_h(str(Path(cfg.classifier).resolve()))}"
    if cfg.no_ema:
        stem += "_raw"
    if not cfg.use_clipped_model_output:
        stem += "_noclip"
    if cfg.noise:
        stem += f"_noise{_h(str(Path(cfg.noise).resolve()))}"
    if cfg.dtype != "float32":
        stem += f"_{cfg.dtype}"
    return stem


def default_out_dir(checkpoint) -> Path:
    """RUN/samples for a run directory or a checkpoint inside RUN/checkpoints/; ./samples otherwise."""
    p = Path(checkpoint).expanduser()
    if p.is_dir() and (p / "checkpoints" / "latest.npz").exists():
        return p / "samples"
    if p.is_file() and p.parent.name == "checkpoints":
        return p.parent.parent / "samples"
    return Path("samples")


def unused_stem(out: Path, stem: str, suffixes=(".png", ".npz")) -> str:
    """stem, or stem-2, stem-3, ...: the first for which no out/<stem><suffix> exists."""
    k, candidate = 1, stem
    while any((out / (candidate + s)).exists() for s in suffixes):
        k += 1
        candidate = f"{stem}-{k}"
    return candidate
