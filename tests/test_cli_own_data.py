"""The command line of issue 20 end to end on tiny settings: an .npz with class names trained and sampled
(names in the files, RUN/samples as the default folder, no overwrite, labels in the .npz), guidance scale 0
running only the unconditional pass, help texts, --no-ema, the description, progress lines in a log file."""

import io
import re

import numpy as np
import pytest

from minidiff.cli import build_parser, main
from minidiff.diffusion.guidance import make_guided_model_fn
from minidiff.training.report import ProgressBar


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    rng = np.random.default_rng(0)
    np.savez(tmp / "d.npz", images=rng.random((6, 3, 10, 8)), labels=np.array([0, 1, 2, 0, 1, 2]),
             class_names=np.array(["ant", "bee", "cat"]))
    out = tmp / "run"
    assert main(["train", "--data", str(tmp / "d.npz"), "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "2", "--gradient-accumulation-steps", "2", "--resolution", "8", "--conditioning",
                 "class", "--sample-every", "0", "--sample-steps", "2", "--lr-schedule", "cosine",
                 "--reference"]) == 0
    return out


def test_sample_names_default_folder_no_overwrite_and_labels(run, capsys):
    args = ["sample", "--checkpoint", str(run), "--n", "3", "--steps", "2", "--class", "1", "--reference"]
    assert main(args) == 0 and main(args) == 0
    assert main(args[:-3] + ["--eta", "0.5", "--reference"]) == 0
    names = sorted(p.name for p in (run / "samples").glob("samples_*.npz"))
    assert names == ["samples_ddim2_eta0.5_s3_classes_seed0_n3.npz", "samples_ddim2_eta0_s3_class1_seed0_n3-2.npz",
                     "samples_ddim2_eta0_s3_class1_seed0_n3.npz"]
    with np.load(run / "samples" / names[-1], allow_pickle=False) as f:
        assert f["labels"].tolist() == [1, 1, 1] and f["images"].shape == (3, 3, 8, 8)


def test_guidance_scale_zero_runs_only_the_unconditional_pass():
    calls = []

    def model_fn(x, t, c):
        calls.append(c.copy())
        return x * 0 + c[:, None, None, None]

    x, t, cond = np.zeros((2, 1, 2, 2)), np.array([5, 5]), np.array([1, 2])
    out = make_guided_model_fn(model_fn, 0.0, np.int64(9))(x, t, cond)
    assert len(calls) == 1 and calls[0].tolist() == [9, 9] and np.all(out == 9)
    both = make_guided_model_fn(model_fn, 0.5, np.int64(9))(x, t, cond)
    assert calls[1].tolist() == [9, 9, 1, 2] and both[0, 0, 0, 0] == 5.0


def test_help_defaults_no_ema_and_description():
    parser = build_parser()
    for cmd in ("train", "sample", "eval"):
        text = parser._subparsers._group_actions[0].choices[cmd].format_help()
        assert "(default:" in text
        assert "--no-no-ema" not in text
    for cmd in ("train", "train-classifier", "sample", "eval", "export", "info", "bench", "fixtures"):
        assert cmd in parser.description
    assert build_parser().parse_args(["sample", "--checkpoint", "x", "--no-ema"]).no_ema is True


def test_progress_bar_writes_lines_when_not_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(100, stream=stream)
    for step in range(1, 101):
        bar.update(step, 4, loss=0.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20
    assert re.match(r"step 5/100 \[", lines[0]) and lines[-1].startswith("step 100/100")
