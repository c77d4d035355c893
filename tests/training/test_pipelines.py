"""diffusers pipeline folders in and out (training/pipelines.py, training/export.py): minidiff's samples equal
DDPMPipeline's and DDIMPipeline's for the same noise, and bad folders get one line naming the file or type.

The comparisons feed both libraries the same draws: minidiff through generate(noise=...), diffusers by
replacing its randn_tensor (the pipeline's x_T, then each scheduler step's draw) with the stored arrays.
float64: diffusers' U-Net in .double() with its float32 time_proj swapped for the same formula in float64,
and its float32 alphas_cumprod swapped for minidiff's float64 one (docs/oracle.md, "DDPM and DDIM
pipelines"); max abs difference < 1e-10 on [-1, 1] images. float32: both libraries as shipped, < 1e-3
(docs/oracle.md says why).
"""

import json
import math
from unittest import mock

import numpy as np
import pytest

from minidiff.diffusion.schedule import make_schedule
from minidiff.training.bundle import load_bundle
from minidiff.training.generate import generate

N, SIZE = 2, 4  # two 4x4 RGB images: CI time goes to the 1000 steps, not to pixels
UNET = dict(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=8, norm_num_groups=4, time_embedding_dim=32)
NUM_CLASSES = 3


@pytest.fixture
def tiny_run(tmp_path):
    """tiny_run(conditioning) -> a 2-step run of the tiny preset on shapes16 (16x16 RGB, 9 classes)."""
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import train

    def make(conditioning):
        out = tmp_path / f"run-{conditioning}"
        train(TrainConfig(out=str(out), preset="tiny", steps=2, batch_size=2, save_every=2, sample_every=0,
                          conditioning=conditioning, shards="threads", threads=1), log=lambda *a, **k: None)
        return out
    return make


def _torch():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.set_num_threads(1)  # tiny networks: one thread is faster on a busy machine
    return torch, diffusers


def save_diffusers_pipeline(folder, conditioning="none", scheduler=None, seed=0):
    """A random-weight DDPMPipeline written by diffusers' own save_pretrained (weights ~N(0, 0.3^2), so that
    every layer matters). Returns the folder."""
    torch, diffusers = _torch()
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**UNET, num_class_embeds=NUM_CLASSES if conditioning == "class" else None)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.3)
    diffusers.DDPMPipeline(unet, scheduler or diffusers.DDPMScheduler()).save_pretrained(folder)
    return folder


class Float64Timesteps:
    """diffusers' get_timestep_embedding in float64 (its Timesteps module computes in float32)."""

    def __init__(self, config):
        self.dim, self.flip, self.shift = config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift

    def __call__(self, t):
        import torch

        half = self.dim // 2
        f = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - self.shift))
        a = t[:, None].double() * f[None, :]
        emb = torch.cat([torch.sin(a), torch.cos(a)], dim=-1)
        return torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if self.flip else emb


def run_diffusers(folder, pipeline, noise, steps, float64, class_labels=None, **call):
    """Images in [-1, 1] (N, C, H, W) of DDPMPipeline / DDIMPipeline loaded from folder, fed noise[0] as x_T
    and noise[1 + i] at step i; float64: the swaps of the module docstring."""
    torch, diffusers = _torch()
    pipe = getattr(diffusers, pipeline).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    dtype = torch.float64 if float64 else torch.float32
    if float64:
        pipe.unet.double()
        pipe.unet.time_proj.forward = Float64Timesteps(pipe.unet.config)
        s = pipe.scheduler
        s.alphas_cumprod = torch.tensor(make_schedule(**schedule_kwargs(s.config)).alphas_cumprod)
        s.one = torch.tensor(1.0, dtype=torch.float64)
        s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if s.config.get("set_alpha_to_one", True) \
            else s.alphas_cumprod[0]
    if class_labels is not None:  # DDPMPipeline / DDIMPipeline call unet(x, t) without labels: bind them
        unet_forward = pipe.unet.forward
        pipe.unet.forward = lambda x, t, **kw: unet_forward(x, t, class_labels=torch.tensor(class_labels), **kw)
    draws = iter([torch.tensor(z, dtype=dtype) for z in noise])
    same_noise = lambda *args, **kwargs: next(draws)  # noqa: E731
    with mock.patch("diffusers.pipelines.ddpm.pipeline_ddpm.randn_tensor", same_noise), \
            mock.patch("diffusers.pipelines.ddim.pipeline_ddim.randn_tensor", same_noise), \
            mock.patch("diffusers.schedulers.scheduling_ddpm.randn_tensor", same_noise), \
            mock.patch("diffusers.schedulers.scheduling_ddim.randn_tensor", same_noise):
        images = pipe(batch_size=len(noise[0]), num_inference_steps=steps, output_type="pt", **call).images
    return images.double().numpy() * 2 - 1  # the pipeline returns (x / 2 + 0.5).clamp(0, 1)


def schedule_kwargs(config):
    return {k: config[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                   "rescale_betas_zero_snr")}


def run_minidiff(folder, sampler, noise, steps, float64, class_labels=None, **kw):
    dtype = "float64" if float64 else "float32"
    bundle = load_bundle(folder, dtype=dtype)
    cond = None if class_labels is None else np.asarray(class_labels)
    x = generate(bundle, cond, len(noise[0]), 1.0, sampler, steps, noise=noise, dtype=dtype, **kw)
    return np.asarray(x, np.float64)


CASES = {  # name: (minidiff sampler, diffusers pipeline, steps, call options)
    "ddpm 1000": pytest.param(("ddpm", "DDPMPipeline", 1000, {}), marks=pytest.mark.slow),  # ~10 s: float64 only
    "ddpm 50": ("ddpm", "DDPMPipeline", 50, {}),
    "ddim 50 eta 0": ("ddim", "DDIMPipeline", 50, dict(eta=0.0)),
    "ddim 50 eta 0 clipped eps": ("ddim", "DDIMPipeline", 50, dict(eta=0.0, use_clipped_model_output=True)),
    "ddim 50 eta 1": ("ddim", "DDIMPipeline", 50, dict(eta=1.0)),
}


@pytest.mark.parametrize("conditioning", ["none", "class"])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_samples_equal_diffusers_pipelines(tmp_path, case, conditioning):
    sampler, pipeline, steps, call = case
    folder = save_diffusers_pipeline(tmp_path / "pipe", conditioning)
    noise = np.random.default_rng(1).standard_normal((1 + steps, N, 3, SIZE, SIZE))
    labels = [2, 0] if conditioning == "class" else None
    ucmo = call.get("use_clipped_model_output", False)  # DDIMPipeline's default
    for float64, tol in ((True, 1e-10), (False, 1e-3))[:1 if steps == 1000 else 2]:
        ref = run_diffusers(folder, pipeline, noise, steps, float64, labels, **call)
        ours = run_minidiff(folder, sampler, noise, steps, float64, labels, eta=call.get("eta", 0.0),
                            use_clipped_model_output=ucmo)
        assert np.abs(ours - ref).max() < tol, (float64, np.abs(ours - ref).max())


def test_bare_unet_folder_takes_the_scheduler_from_options(tmp_path):
    torch, diffusers = _torch()
    options = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    save_diffusers_pipeline(tmp_path / "pipe", scheduler=diffusers.DDPMScheduler(**options))
    steps, noise = 20, np.random.default_rng(2).standard_normal((21, N, 3, SIZE, SIZE))
    ref = run_diffusers(tmp_path / "pipe", "DDPMPipeline", noise, steps, float64=True)
    bundle = load_bundle(tmp_path / "pipe" / "unet", dtype="float64", scheduler=options)  # config.json + weights
    ours = generate(bundle, None, N, 1.0, "ddpm", steps, noise=noise, dtype="float64")
    assert np.abs(ours - ref).max() < 1e-10
    with pytest.raises(ValueError, match="scheduler flags"):  # a pipeline brings its own scheduler
        load_bundle(tmp_path / "pipe", scheduler=options)


def test_scheduler_fields_map_onto_minidiff_options(tmp_path):
    torch, diffusers = _torch()
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.001, beta_end=0.015,
                                        clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing",
                                        prediction_type="sample", rescale_betas_zero_snr=False)
    folder = save_diffusers_pipeline(tmp_path / "pipe", scheduler=scheduler)
    bundle = load_bundle(folder, dtype="float64")
    assert bundle.prediction_type == "sample"
    assert bundle.sampler_options == dict(variance_type="fixed_small", clip_sample=False, clip_sample_range=1.0,
                                          timestep_spacing="trailing", steps_offset=0, set_alpha_to_one=False)
    np.testing.assert_allclose(bundle.schedule.betas, make_schedule(1000, "scaled_linear", 0.001, 0.015).betas)
    # trailing spacing with 7 steps: DDIMScheduler steps to t - T // n, which generate() follows
    steps, noise = 7, np.random.default_rng(3).standard_normal((8, N, 3, SIZE, SIZE))
    ref = run_diffusers(folder, "DDIMPipeline", noise, steps, float64=True, eta=0.5)
    ours = generate(bundle, None, N, 1.0, "ddim", steps, eta=0.5, noise=noise, dtype="float64",
                    use_clipped_model_output=False)
    assert np.abs(ours - ref).max() < 1e-10


def test_use_clipped_model_output_changes_ddim_samples(tmp_path):
    """The two DDIM conventions differ wherever x0^ is clipped (docs/conventions.md gives the measured size)."""
    torch, diffusers = _torch()
    folder = save_diffusers_pipeline(tmp_path / "pipe")
    bundle = load_bundle(folder, dtype="float64")
    noise = np.random.default_rng(4).standard_normal((N, 3, SIZE, SIZE))  # x_T only: eta 0 draws nothing else
    a = generate(bundle, None, N, 1.0, "ddim", 50, noise=noise, dtype="float64", use_clipped_model_output=True)
    b = generate(bundle, None, N, 1.0, "ddim", 50, noise=noise, dtype="float64", use_clipped_model_output=False)
    assert np.abs(a - b).max() > 1e-2


def test_export_loads_in_diffusers_and_reproduces_minidiff(tmp_path, tiny_run):
    torch, diffusers = _torch()
    from minidiff.training.export import export_pipeline

    for conditioning in ("none", "class"):
        run = tiny_run(conditioning)
        out = export_pipeline(run, tmp_path / f"export-{conditioning}")
        labels = [1, 0] if conditioning == "class" else None
        for pipeline, sampler, steps, call in (("DDPMPipeline", "ddpm", 30, {}),
                                               ("DDIMPipeline", "ddim", 20, dict(eta=1.0))):
            noise = np.random.default_rng(5).standard_normal((1 + steps, N, 3, 16, 16))
            ref = run_diffusers(out, pipeline, noise, steps, True, labels, **call)
            bundle = load_bundle(run, dtype="float64")
            ours = generate(bundle, None if labels is None else np.array(labels), N, 1.0, sampler, steps,
                            eta=call.get("eta", 0.0), noise=noise, dtype="float64", use_clipped_model_output=False)
            assert np.abs(ours - ref).max() < 1e-10, (conditioning, pipeline)
            again = load_bundle(out, dtype="float64")  # minidiff reads its export back: the same samples
            np.testing.assert_array_equal(generate(again, None if labels is None else np.array(labels), N, 1.0,
                                                   sampler, steps, eta=call.get("eta", 0.0), noise=noise,
                                                   dtype="float64", use_clipped_model_output=False), ours)


def test_export_fsyncs_the_folder_after_its_rename(tmp_path, tiny_run, monkeypatch):
    """The export folder is renamed into place, then its parent folder is fsync'ed (the rename itself reaches the
    disk; the files in it were fsync'ed as they were written)."""
    from minidiff.training import export

    run = tiny_run("none")
    out = tmp_path / "exports" / "pipe"
    calls = []
    real = export.fsync_dir
    monkeypatch.setattr(export, "fsync_dir", lambda folder: (calls.append((folder, out.exists())), real(folder)))
    export.export_pipeline(run, out)
    assert (out.parent, True) in calls, calls


def test_text_export_is_read_back_by_minidiff_and_refused_by_diffusers(tmp_path, tiny_run):
    from minidiff.training.export import export_pipeline

    run = tiny_run("text")
    out = export_pipeline(run, tmp_path / "export")
    assert json.loads((out / "unet" / "config.json").read_text())["_class_name"] == "MinidiffTextUNet2DModel"
    a, b = load_bundle(run), load_bundle(out)
    cond = a.encode(prompts=["red circle", ""])
    noise = np.random.default_rng(6).standard_normal((N, 3, 16, 16))
    np.testing.assert_array_equal(generate(a, cond, N, 3.0, "ddim", 4, noise=noise),
                                  generate(b, cond, N, 3.0, "ddim", 4, noise=noise))
    torch, diffusers = _torch()
    with pytest.raises(Exception):  # no diffusers class builds added-KV cross-attention into UNet2DModel's layout
        diffusers.DDPMPipeline.from_pretrained(out)
