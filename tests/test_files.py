"""files.py: the one atomic writer (temporary file, fsync, os.replace, fsync of the folder), and every writer of
minidiff going through it: checkpoints, run files, pretrained weights, the command line's outputs, fixtures."""

import errno
import json
import os
import stat

import numpy as np
import pytest

from minidiff.files import write_atomic


def _writers(tmp_path):
    """(name, write) pairs: each write() saves one file (or folder) under tmp_path through a writer of minidiff."""
    from minidiff import fixtures
    from minidiff.model.config import get_preset
    from minidiff.model.pretrained import save_pretrained
    from minidiff.model.unet import init_params
    from minidiff.training.checkpoint import save_checkpoint
    from minidiff.training.previews import save_loss_png
    from minidiff.training.run_folder import write_atomic as run_file

    class Run:  # what save_loss_png reads of a Trainer
        out, losses = tmp_path, [0.5, 0.3, 0.2]

    cfg = get_preset("tiny")
    params = init_params(cfg, seed=0)
    return {
        "files.write_atomic": lambda: write_atomic(tmp_path / "a.bin", b"abc"),
        "run_folder.write_atomic": lambda: run_file(tmp_path / "config.json", b"{}"),
        "checkpoint.save_checkpoint": lambda: save_checkpoint(tmp_path / "latest.npz", {"w": np.ones(3)}, {"step": 1}),
        "pretrained.npz": lambda: save_pretrained(params, cfg, tmp_path / "w.npz"),
        "pretrained.safetensors": lambda: save_pretrained(params, cfg, tmp_path / "w.safetensors"),
        "pretrained.diffusers": lambda: save_pretrained(params, cfg, tmp_path / "folder"),
        "fixtures": lambda: fixtures.write_fixtures(tmp_path / "fx", groups=["schedules"]),
        "previews.save_loss_png": lambda: save_loss_png(Run),
    }


WRITERS = ["files.write_atomic", "run_folder.write_atomic", "checkpoint.save_checkpoint", "pretrained.npz",
           "pretrained.safetensors", "pretrained.diffusers", "fixtures", "previews.save_loss_png"]


@pytest.mark.parametrize("name", WRITERS)
def test_every_atomic_writer_fsyncs_the_file_then_renames_then_fsyncs_the_folder(tmp_path, monkeypatch, name):
    """Each file a writer makes is fsync'ed before os.replace points its name at it, and its folder is fsync'ed
    after the rename: a power loss leaves the old file or the new one (pretrained weights and fixtures were renamed
    without either fsync, as were the command line's eval.json, grids and nll.json: files.write_atomic now)."""
    if name.startswith("pretrained.s") or name == "pretrained.diffusers":
        pytest.importorskip("safetensors")
    write = _writers(tmp_path)[name]
    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write()
    assert events and events == ["fsync file", "replace", "fsync folder"] * (len(events) // 3), events
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_write_atomic_that_fails_leaves_the_old_file_and_names_it(tmp_path, monkeypatch):
    """A full disk in the middle of a write: the old file is untouched, no temporary file is left, and the OSError
    names the file being written (not its temporary name)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"old": 1}))

    def half(f):
        f.write(b'{"new"')
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        write_atomic(path, half)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert json.loads(path.read_text()) == {"old": 1} and sorted(os.listdir(tmp_path)) == ["config.json"]
