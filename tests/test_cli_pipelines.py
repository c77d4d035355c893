"""`minidiff sample/eval --checkpoint FOLDER` and `minidiff export` (issue 18) from the command line: a run
exported as a diffusers pipeline samples the same images as the run for the same --noise; bad folders,
files and flags get exit status 2 and one line naming what is wrong; --out is never overwritten without --force.
Needs neither torch nor diffusers (tests/training/test_pipelines.py compares with diffusers)."""

import json

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.model.config import get_preset
from minidiff.model.pretrained import save_pretrained
from minidiff.model.unet import init_params
from minidiff.training.config import TrainConfig
from minidiff.training.trainer import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{conditioning: a 2-step run of the tiny preset on shapes16} for none and class."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for conditioning in ("none", "class"):
        out[conditioning] = root / conditioning
        train(TrainConfig(out=str(out[conditioning]), preset="tiny", steps=2, batch_size=2, save_every=2,
                          sample_every=0, conditioning=conditioning, shards="threads", threads=1),
              log=lambda *a, **k: None)
    return out


def one_error_line(capsys, *words):
    """The one error line on stderr (earlier progress bars aside), holding every word."""
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip() and "step/s" not in line]
    assert len(lines) == 1 and lines[0].startswith("minidiff "), lines
    err = lines[0]
    for w in words:
        assert w in err, (w, err)
    return err


def sample_images(tmp_path, checkpoint, *flags):
    sdir = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(sdir), "--n", "2", "--steps", "3",
                 "--guidance-scale", "1", *flags]) == 0
    (npz,) = sdir.glob("*.npz")
    with np.load(npz, allow_pickle=False) as f:
        images = f["images"]
    npz.unlink()
    return images


@pytest.mark.parametrize("conditioning", ["none", "class"])
def test_export_then_sample_gives_the_runs_samples(tmp_path, runs, capsys, conditioning):
    run, out = runs[conditioning], tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["minidiff.json", "model_index.json", "scheduler", "unet"]
    index = json.loads((out / "model_index.json").read_text())
    assert index == {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
                     "scheduler": ["diffusers", "DDPMScheduler"]}
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "DDPMScheduler" and sched["clip_sample"] is True
    np.save(tmp_path / "noise.npy", np.random.default_rng(0).standard_normal((4, 2, 3, 16, 16)))
    for sampler, extra in (("ddpm", []), ("ddim", ["--eta", "1"]), ("ddim", ["--no-use-clipped-model-output"])):
        flags = ["--sampler", sampler, "--noise", str(tmp_path / "noise.npy"), *extra]
        np.testing.assert_array_equal(sample_images(tmp_path, run, *flags), sample_images(tmp_path, out, *flags))
    # the EMA weights by default; --no-ema the raw ones; --force replaces the earlier export only
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--no-ema"]) == 2
    one_error_line(capsys, "exists", "--force")
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--no-ema", "--force"]) == 0
    assert json.loads((out / "minidiff.json").read_text())["weights"] == "raw"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_noise_flag_fixes_the_samples_and_checks_its_shape(tmp_path, runs, capsys):
    run = runs["none"]
    np.save(tmp_path / "xT.npy", np.random.default_rng(1).standard_normal((2, 3, 16, 16)))
    a = sample_images(tmp_path, run, "--noise", str(tmp_path / "xT.npy"), "--seed", "1")
    b = sample_images(tmp_path, run, "--noise", str(tmp_path / "xT.npy"), "--seed", "2")
    np.testing.assert_array_equal(a, b)  # DDIM eta 0: x_T is the only draw
    np.save(tmp_path / "bad.npy", np.zeros((3, 3, 16, 16)))
    assert main(["sample", "--checkpoint", str(run), "--out", str(tmp_path), "--n", "2", "--noise",
                 str(tmp_path / "bad.npy")]) == 2
    one_error_line(capsys, "noise must have shape (2, 3, 16, 16)")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    assert main(["sample", "--checkpoint", str(run), "--noise", str(tmp_path / "junk.npy")]) == 2
    one_error_line(capsys, "junk.npy")


def test_eval_reads_an_exported_pipeline(tmp_path, runs, capsys):
    out = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(runs["class"]), "--out", str(out)]) == 0
    assert main(["eval", "--checkpoint", str(out), "--n-per-class", "1", "--scales", "1", "--steps", "2",
                 "--threads", "1", "--shards", "threads"]) == 0
    assert json.loads((out / "eval.json").read_text())["n"] == 9


def write_unet_folder(folder, **config_changes):
    """A bare UNet2DModel folder (config.json + safetensors) of the tiny preset with random weights."""
    config = get_preset("tiny")
    save_pretrained(init_params(config, seed=0), config, folder)
    if config_changes:
        d = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(d, **config_changes)))
    return folder


def test_bare_unet_folder_samples_with_scheduler_flags(tmp_path, runs, capsys):
    unet = write_unet_folder(tmp_path / "unet")
    images = sample_images(tmp_path, unet, "--beta-schedule", "squaredcos_cap_v2", "--num-train-timesteps", "100")
    assert images.shape == (2, 3, 8, 8) and np.all(np.abs(images) <= 1)
    assert main(["sample", "--checkpoint", str(unet), "--beta-schedule", "laplace"]) == 2
    one_error_line(capsys, "beta_schedule", "laplace")
    assert main(["sample", "--checkpoint", str(runs["none"]), "--prediction-type", "sample"]) == 2
    one_error_line(capsys, "--prediction-type", "bare UNet2DModel folder only")


def test_bad_folders_and_files_get_one_line_naming_them(tmp_path, runs, capsys):
    def fails(checkpoint, *words):
        assert main(["sample", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "s")]) == 2
        return one_error_line(capsys, *words)

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "neither a minidiff run", "checkpoints/latest.npz", "model_index.json", "config.json")
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    one_error_line(capsys, "neither a minidiff run")

    pipe = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(runs["none"]), "--out", str(pipe)]) == 0
    capsys.readouterr()
    index = json.loads((pipe / "model_index.json").read_text())
    sched_file = pipe / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())

    (pipe / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    fails(pipe, "StableDiffusionPipeline", "model_index.json")
    (pipe / "model_index.json").write_text(json.dumps(dict(index, vae=["diffusers", "AutoencoderKL"])))
    fails(pipe, "'vae'")
    (pipe / "model_index.json").write_text('{"_class_name": "DDPMPipeline", ')  # truncated
    fails(pipe, "model_index.json", "not a readable JSON file")
    (pipe / "model_index.json").write_text(json.dumps(index))

    for bad, words in ((dict(sched, _class_name="EulerDiscreteScheduler"), ["EulerDiscreteScheduler"]),
                       (dict(sched, timestep_type="discrete"), ["timestep_type", "scheduler_config.json"]),
                       (dict(sched, thresholding=True), ["thresholding"]),
                       (dict(sched, variance_type="learned_sideways"), ["variance_type", "learned_sideways"])):
        sched_file.write_text(json.dumps(bad))
        fails(pipe, *words)
    sched_file.write_text("[1, 2")
    fails(pipe, "scheduler_config.json", "not a readable JSON file")
    sched_file.write_text(json.dumps(sched))

    config_file = pipe / "unet" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, _class_name="UNet2DConditionModel")))
    fails(pipe, "UNet2DConditionModel", "config.json")
    config_file.write_text(json.dumps(dict(config, down_block_types=["CrossAttnDownBlock2D", "AttnDownBlock2D"])))
    fails(pipe, "CrossAttnDownBlock2D")
    config_file.write_text(json.dumps(config))

    weights = pipe / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    fails(pipe, "diffusion_pytorch_model.safetensors", "not a readable safetensors file")
    weights.unlink()
    (pipe / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 a pickle")  # never loaded
    fails(pipe, "diffusion_pytorch_model.bin", "pickle", "safe_serialization=True")
    (tmp_path / "model.pt").write_bytes(b"\x80\x04 a pickle")
    fails(tmp_path / "model.pt", "model.pt", "pickle")


def test_export_never_overwrites_what_it_did_not_write(tmp_path, runs, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for flags in ([], ["--force"]):
        assert main(["export", "--checkpoint", str(runs["none"]), "--out", str(mine), *flags]) == 2
        one_error_line(capsys, str(mine))
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    (tmp_path / "file").write_text("x")
    assert main(["export", "--checkpoint", str(runs["none"]), "--out", str(tmp_path / "file")]) == 2
    one_error_line(capsys, "is a file")
    assert main(["export", "--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    one_error_line(capsys, "nothing")
    assert not (tmp_path / "x").exists()
