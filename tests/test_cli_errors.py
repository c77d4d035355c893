"""Issue 17 item 3: every OSError, MemoryError, PIL, safetensors and JSON error is one line on stderr
naming the path, with the exit status documented in `minidiff --help` (cli.EXIT_CODES); no traceback."""

import errno
import json
import os

import numpy as np
import pytest

from minidiff import cli
from minidiff.cli import main


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


class SafetensorError(Exception):
    """Stands in for safetensors_rust.SafetensorError (matched by name: safetensors is optional)."""


class DecompressionBombError(Exception):
    """Stands in for PIL.Image.DecompressionBombError (matched by name)."""


CASES = [
    (OSError(errno.ENOSPC, "No space left on device", "/r/checkpoints/latest.npz"), 3, "disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/r/out"), 3, "permission denied"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/r/file/out"), 3, "is a file, not a folder"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/r/out"), 3, "is a folder where a file"),
    (OSError(errno.EROFS, "Read-only file system", "/r/out"), 3, "read-only"),
    (OSError(errno.EIO, "Input/output error", "/r/x"), 3, "check the path"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/r/x"), 2, "No such file"),
    (FileExistsError(errno.EEXIST, "File exists", "/r/x"), 3, "File exists"),
    (MemoryError("Unable to allocate 7.45 GiB"), 4, "out of memory"),
    (DecompressionBombError("Image size (2500000000 pixels) exceeds limit"), 2, "cannot read an image"),
    (SafetensorError("Error while deserializing header: HeaderTooLarge"), 2, "malformed .safetensors"),
    (json.JSONDecodeError("Expecting value", "x", 0), 2, "Expecting value"),
    (ValueError("a bad flag\nover two lines"), 2, "a bad flag over two lines"),
]


@pytest.mark.parametrize("exc,code,words", CASES, ids=[type(c[0]).__name__ + str(i) for i, c in enumerate(CASES)])
def test_issue17_every_expected_error_is_one_line_with_its_exit_status(monkeypatch, capsys, exc, code, words):
    def fails(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_export", fails)
    assert main(["export", "--checkpoint", "c", "--out", "o"]) == code
    line = one_line(capsys)
    assert line.startswith("minidiff export: error: ") and words in line
    if getattr(exc, "filename", None):
        assert exc.filename in line


def test_issue17_a_bug_keeps_its_traceback(monkeypatch):
    def fails(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_export", fails)
    with pytest.raises(KeyError):
        main(["export", "--checkpoint", "c", "--out", "o"])


def test_issue17_exit_codes_are_documented(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for code in ("0", "1", "2", "3", "4", "130"):
        assert f"\n  {code} " in out


def test_issue17_out_under_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    rc = main(["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "file" / "run")])
    line = one_line(capsys)
    assert rc in (2, 3) and str(tmp_path / "file") in line


def test_issue17_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_temp(tmp_path, capsys, monkeypatch):
    from minidiff.training import checkpoint

    real_fsync = os.fsync

    def full(fd):  # the checkpoint's bytes only: config.json's rewrite is fsync'ed too (run_folder.write_atomic)
        if ".npz.tmp-" not in os.readlink(f"/proc/self/fd/{fd}"):
            return real_fsync(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    out = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--steps", "1", "--batch-size", "2", "--sample-every", "0",
               "--reference", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3 and "Traceback" not in "".join(err)
    assert "latest.npz" in err[-1] and "disk is full" in err[-1]
    assert not list((out / "checkpoints").glob("*.tmp-*"))


FLAG_CASES = [
    (["sample", "--checkpoint", "c", "--guidance-scale", "nan"], "--guidance-scale: must be a finite number"),
    (["sample", "--checkpoint", "c", "--guidance-scale", "inf"], "--guidance-scale: must be a finite number"),
    (["sample", "--checkpoint", "c", "--classifier-scale", "inf"], "--classifier-scale: must be a finite"),
    (["sample", "--checkpoint", "c", "--eta", "nan"], "--eta: must be a finite number"),
    (["sample", "--checkpoint", "c", "--eta", "-1"], "--eta must be >= 0.0"),
    (["sample", "--checkpoint", "c", "--guidance-rescale", "2"], "--guidance-rescale must be in [0.0, 1.0]"),
    (["sample", "--checkpoint", "c", "--class", "-5"], "--class must be -1"),
    (["train", "--grad-clip", "nan"], "--grad-clip: must be a finite number"),
    (["train", "--grad-clip", "-1"], "--grad-clip must be >= 0.0"),
    (["train", "--lr", "nan"], "--lr: must be a finite number"),
    (["train", "--lr", "inf"], "--lr: must be a finite number"),
    (["train", "--ema-decay", "nan"], "--ema-decay: must be a finite number"),
    (["train", "--ema-decay", "1.5"], "--ema-decay must be in [0, 1)"),
    (["train", "--dropout", "inf"], "--dropout: must be a finite number"),
    (["train-classifier", "--lr", "nan"], "--lr: must be a finite number"),
    (["eval", "--checkpoint", "c", "--scales", "1", "nan"], "--scales: must be a finite number"),
]


def exit_status(argv) -> int:
    """main(argv)'s exit status, also where argparse's own check (a type= function) exits at parse time."""
    try:
        return main(argv)
    except SystemExit as done:
        return done.code


@pytest.mark.parametrize("argv,words", FLAG_CASES, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in FLAG_CASES])
def test_issue17_every_float_flag_is_finite_and_in_range(tmp_path, capsys, argv, words):
    argv = argv + (["--out", str(tmp_path / "o")] if argv[0] != "eval" else [])
    assert exit_status(argv) == 2
    assert words in one_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("typed", ["1e400", "-1e400", "nan"])
def test_eval_scales_that_are_not_finite_are_echoed_as_typed(tmp_path, capsys, typed):
    """--scales 1e400 reads as inf: the error names what was typed ("got 1e400", not "got inf")."""
    assert exit_status(["eval", "--checkpoint", "c", "--scales", "1", typed, "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys)
    assert "--scales" in line and f"must be a finite number, got {typed} " in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [["train", "--lr", "1e400"], ["train", "--lr", "-1e400"],
                                  ["sample", "--checkpoint", "c", "--guidance-scale", "1e999"]])
def test_every_float_flag_that_is_not_finite_is_echoed_as_typed(tmp_path, capsys, argv):
    """Every float flag made from a config field (training/config.py add_dataclass_args) says what was typed."""
    assert exit_status(argv + ["--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys)
    assert f"{argv[-2]}: must be a finite number, got {argv[-1]} " in line, line
    assert not (tmp_path / "o").exists()


def test_eval_scales_that_are_not_numbers_say_what_is_allowed(tmp_path, capsys):
    """Not "invalid finite_float value" (the type function's name): the flag, what is allowed, what was typed."""
    assert exit_status(["eval", "--checkpoint", "c", "--scales", "abc", "--out", str(tmp_path / "o")]) == 2
    line = one_line(capsys)
    assert "--scales: must be a finite number, got 'abc'" in line and "finite_float" not in line, line


def test_issue17_class_must_be_a_class_of_the_model(tmp_path, capsys):
    from minidiff.training.config import TrainConfig
    from minidiff.training.trainer import train

    train(TrainConfig(out=str(tmp_path / "run"), preset="tiny", steps=1, batch_size=2, sample_every=0,
                      conditioning="class", threads=1), log=lambda *a, **k: None)
    capsys.readouterr()
    rc = main(["sample", "--checkpoint", str(tmp_path / "run"), "--class", "99", "--n", "2", "--steps", "2",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "--class 99 is not a class of this model" in one_line(capsys)
