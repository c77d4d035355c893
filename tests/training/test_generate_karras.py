"""`minidiff sample` and `minidiff eval` with --sampler euler | euler_a | heun | dpm++2m and --karras, on a
one-step tiny run; bad combinations get one line (exit status 2)."""

import json

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.training.bundle import load_bundle
from minidiff.training.generate import generate


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("karras") / "run"
    assert main(["train", "--out", str(out), "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                 "--conditioning", "class", "--sample-every", "0", "--sample-steps", "2", "--threads", "1"]) == 0
    return out


@pytest.mark.parametrize("sampler,karras", [("euler", False), ("euler_a", True), ("heun", True), ("dpm++2m", True)])
def test_cli_samples_with_each_karras_sampler(run, tmp_path, sampler, karras):
    argv = ["sample", "--checkpoint", str(run), "--out", str(tmp_path), "--sampler", sampler, "--steps", "3",
            "--n", "2", "--class", "1", "--threads", "1"] + (["--karras"] if karras else [])
    assert main(argv) == 0
    x = np.load(next(tmp_path.glob("*.npz")), allow_pickle=False)["images"]
    assert x.shape == (2, 3, 16, 16) and np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1)
    assert next(tmp_path.glob("*.png")).name.startswith(f"samples_{sampler}{'_karras' if karras else ''}3_")


def test_cli_eval_takes_the_sampler_and_karras(run, tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(run), "--sampler", "dpm++2m", "--karras", "--steps", "2",
                 "--n-per-class", "1", "--scales", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["sampler"] == "dpm++2m" and saved["karras"] is True and "1" in saved["accuracy"]
    assert "dpm++2m karras 2 steps" in capsys.readouterr().out


@pytest.mark.parametrize("argv,match", [
    (["sample", "--sampler", "ddim", "--karras"], "use_karras_sigmas (--karras) needs sampler"),
    (["sample", "--sampler", "lms"], "sampler must be one of"),
    (["sample", "--sampler", "dpm++2m", "--steps", "0"], "steps must be in"),
    (["sample", "--sampler", "euler", "--steps", "1001"], "num_inference_steps must be in"),
    (["eval", "--sampler", "ddpm", "--karras", "--steps", "2", "--n-per-class", "1", "--scales", "1"],
     "use_karras_sigmas (--karras) needs sampler"),
])
def test_bad_sampler_options_are_one_line(run, tmp_path, capsys, argv, match):
    assert main(argv[:1] + ["--checkpoint", str(run), "--out", str(tmp_path), "--threads", "1"] + argv[1:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0]


def test_classifier_guidance_is_refused_with_a_karras_sampler(run):
    bundle = load_bundle(run)
    with pytest.raises(ValueError, match="classifier guidance .* runs with --sampler ddpm or ddim"):
        generate(bundle, np.zeros(2, np.int64), 2, 1.0, "euler", 2, grad_fn=lambda x, t, y: x, classifier_scale=1.0)
