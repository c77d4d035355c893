"""The main job end to end on tiny settings: exact resume, no overwrites, NaN stop, CLI errors; the
reference and the fast ops tables train alike; a split batch gets the unsplit batch's dropout masks."""

import json

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.fast.ops import fast_ops
from minidiff.nn.ops import REFERENCE
from minidiff.training import trainer as trainer_mod
from minidiff.training.trainer import Trainer, TrainingDiverged, train

from tiny_runs import quiet, tiny_config


def tiny_cfg(out, **kw):
    return tiny_config(out, **(dict(steps=6, batch_size=4, save_every=2, sample_steps=2, warmup_steps=2) | kw))


@pytest.mark.parametrize("conditioning", ["text", "class"])
def test_interrupted_and_resumed_run_repeats_the_losses(tmp_path, conditioning):
    full = train(tiny_cfg(tmp_path / "a", conditioning=conditioning, dropout=0.1), log=quiet)
    part = train(tiny_cfg(tmp_path / "b", conditioning=conditioning, dropout=0.1), stop_after=3, log=quiet)
    assert part["steps"] == 3
    rest = train(tiny_cfg(tmp_path / "b", conditioning=conditioning, dropout=0.1, resume=True), log=quiet)
    assert rest["steps"] == 6
    assert len(full["losses"]) == 6
    assert rest["losses"] == full["losses"]  # bit-identical, not approximately equal
    # and the final weights agree too
    from minidiff.training.checkpoint import load_checkpoint

    a, _ = load_checkpoint(tmp_path / "a" / "checkpoints" / "latest.npz")
    b, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "latest.npz")
    for k in a["params"]:
        np.testing.assert_array_equal(a["params"][k], b["params"][k])
        np.testing.assert_array_equal(a["ema"][k], b["ema"][k])


def test_run_directory_files_and_log(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, sample_every=3), log=quiet)
    assert (out / "config.json").exists() and (out / "loss.png").exists()
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    lines = [json.loads(s) for s in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in lines)


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2), log=quiet)
    before = (out / "checkpoints" / "latest.npz").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(tiny_cfg(out, steps=2), log=quiet)
    assert (out / "checkpoints" / "latest.npz").read_bytes() == before


def poison_loss(monkeypatch, call: int, factor: float) -> None:
    """Make the call-th diffusion_loss (one per step: the batch in one piece) return loss * factor (nan or inf)."""
    real, calls = trainer_mod.diffusion_loss, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        loss, d = real(*a, **k)
        return (loss * factor if calls["n"] == call else loss), d

    monkeypatch.setattr(trainer_mod, "diffusion_loss", poisoned)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    poison_loss(monkeypatch, 3, np.nan)
    with pytest.raises(TrainingDiverged, match="step 3"):
        train(tiny_cfg(out, threads=1), log=quiet)  # REFERENCE: one loss call per step
    from minidiff.training.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta["step"] == 2 and all(np.isfinite(meta["losses"]))


def test_losses_read_in_batches_still_stop_at_the_first_bad_step(tmp_path, monkeypatch):
    """The GPU path: losses stay on the device and are read every log_every steps; the check then
    names the first non-finite step, and no checkpoint is written after it."""
    out = tmp_path / "run"
    poison_loss(monkeypatch, 5, np.inf)
    trainer = Trainer(tiny_cfg(out, threads=1, steps=8, save_every=4, log_every=4), log=quiet)
    trainer.flush_every = 4  # as on a GPU (cfg.log_every)
    with pytest.raises(TrainingDiverged, match="loss became inf at step 5"):
        trainer.run()
    from minidiff.training.checkpoint import load_checkpoint

    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta["step"] == 4 and len(meta["losses"]) == 4 and all(np.isfinite(meta["losses"]))
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_resume_with_another_config_names_the_field(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2), log=quiet)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(tiny_cfg(out, steps=4, batch_size=8, resume=True), log=quiet)


def test_cli_train_then_sample_with_prompt_and_guidance(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
            "--sample-every", "0", "--sample-steps", "2"]
    assert main(args) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    sdir = tmp_path / "s"
    assert main(["sample", "--checkpoint", str(out), "--out", str(sdir), "--prompt", "red circle;small blue square",
                 "--guidance-scale", "3", "--steps", "3", "--n", "4"]) == 0
    pngs = list(sdir.glob("*.png"))
    assert len(pngs) == 1
    x = np.load(next(sdir.glob("*.npz")), allow_pickle=False)["images"]
    assert x.shape == (4, 3, 16, 16) and np.all(np.abs(x) <= 1)
    # bad input: one clear line each
    assert main(["sample", "--checkpoint", str(out), "--out", str(sdir), "--prompt", "purple hexagon"]) == 2
    assert "purple" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "nothing.npz")]) == 2
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["sample", "--checkpoint", str(bad)]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_cli_class_conditioned_sample_rejects_a_class_out_of_range(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--preset", "tiny", "--steps", "1", "--batch-size", "2",
                 "--conditioning", "class", "--sample-every", "0", "--sample-steps", "2"]) == 0
    assert main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s"), "--class", "9"]) == 2
    assert "class" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "s"), "--class", "7", "--n", "2",
                 "--steps", "2"]) == 0


@pytest.mark.parametrize("argv", [["train", "--tf32"], ["sample", "--checkpoint", "x", "--tf32"],
                                  ["eval", "--checkpoint", "x", "--tf32"], ["bench", "--tf32", "--no-torch"],
                                  ["train", "--tf32", "--device", "gpu", "--dtype", "float64"]])
def test_tf32_is_refused_off_the_gpu_and_for_float64(tmp_path, capsys, argv):
    if "gpu" in argv:
        pytest.importorskip("cupy")  # without CuPy the GPU error comes first
    assert main(argv + (["--out", str(tmp_path / "run")] if argv[0] == "train" else [])) == 2
    assert "--tf32 needs --device gpu and --dtype float32" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_shards_is_one_line_naming_the_flag(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--shards", "fibers", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--shards must be one of ['threads', 'processes'], got 'fibers'" in err and err.count("\n") == 1
    assert not out.exists()  # nothing written
    with pytest.raises(SystemExit):  # argparse's choices: eval and bench
        main(["eval", "--checkpoint", "x", "--shards", "fibers"])
    assert "invalid choice: 'fibers'" in capsys.readouterr().err


def test_reference_and_fast_ops_train_alike(tmp_path):
    """Three steps of the tiny preset (dropout on, text prompts) with REFERENCE and with the fast table, whole
    and in 2 shards (threads and processes): the same losses and weights up to float rounding (float64 here;
    Winograd and the refolded GroupNorm round differently), the same draws from the generator."""
    kw = dict(steps=3, save_every=3, dtype="float64", dropout=0.1, batch_size=5)
    runs = {}
    for name, ops in (("reference", REFERENCE), ("fast", fast_ops(1)), ("threads", fast_ops(2, "threads")),
                      ("processes", fast_ops(2, "processes"))):
        t = Trainer(tiny_cfg(tmp_path / name, **kw), log=quiet, ops=ops)
        for _ in range(3):
            t.train_step()
        t.flush_losses()
        runs[name] = t
    ref = runs["reference"]
    for name, t in runs.items():
        assert t.losses == pytest.approx(ref.losses, rel=1e-10), name
        assert max(float(np.abs(t.params[k] - ref.params[k]).max()) for k in ref.params) < 1e-10, name
        assert t.rng.bit_generator.state == ref.rng.bit_generator.state, name
    assert runs["processes"].losses == runs["threads"].losses  # bit for bit


def test_a_split_batch_gets_the_unsplit_batchs_dropout_masks(tmp_path, monkeypatch):
    """With dropout the masks are drawn once for the batch (after eps) and each shard gets its rows of them."""
    seen = []

    def spy(batch, **shared):
        seen.append(batch["dropout_masks"])
        return real(batch, **shared)

    real = trainer_mod.loss_and_grads
    monkeypatch.setattr(trainer_mod, "loss_and_grads", spy)
    masks = {}
    for workers in (1, 3):
        seen.clear()
        t = Trainer(tiny_cfg(tmp_path / str(workers), dropout=0.3, batch_size=5), log=quiet,
                    ops=fast_ops(workers, "threads"))
        t.train_step()
        assert len(seen) == workers and seen[0] is not None
        masks[workers] = {k: np.concatenate([part[k] for part in seen]) for k in seen[0]}
    assert list(masks[1]) == list(masks[3]) and len(masks[1]) > 0
    for k, m in masks[1].items():
        assert m.shape[0] == 5 and 0 < m.mean() < 1
        np.testing.assert_array_equal(masks[3][k], m)


def test_cli_reference_trains(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--reference", "--out", str(out), "--preset", "tiny", "--steps", "2", "--batch-size", "2",
                 "--sample-every", "0", "--sample-steps", "2"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["train_config"]["reference"] is True
    assert main(["sample", "--reference", "--checkpoint", str(out), "--out", str(tmp_path / "s"), "--steps", "2",
                 "--n", "2"]) == 0


def test_issue17_diverged_weights_are_never_saved(tmp_path):
    """Issue 17 item 2: --lr 1e6 gives a finite loss at step 1 but huge weights whose output is NaN;
    that step is not saved (the kept checkpoint is the last one whose weights give a finite output)."""
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="after step 1 give a non-finite output.*no checkpoint was written"):
        train(tiny_cfg(out, lr=1e6, save_every=1, warmup_steps=0, threads=1), log=quiet)
    assert not (out / "checkpoints" / "latest.npz").exists()


def test_issue17_non_finite_weights_are_never_saved(tmp_path):
    """A NaN in the weights, the EMA weights or the Adam moments is refused at save; latest.npz stays."""
    out = tmp_path / "run"
    trainer = Trainer(tiny_cfg(out, threads=1), log=quiet)
    trainer.run(stop_after=2)
    before = (out / "checkpoints" / "latest.npz").read_bytes()
    for group in (trainer.params, trainer.ema.shadow, trainer.opt.exp_avg_sq):
        k = next(iter(group))
        keep = group[k].copy()
        group[k].flat[0] = np.nan
        with pytest.raises(TrainingDiverged, match="are not finite.*last good checkpoint"):
            trainer.save()
        group[k][...] = keep
    assert (out / "checkpoints" / "latest.npz").read_bytes() == before


def _poisoned_checkpoint(tmp_path, value):
    from minidiff.training.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2, threads=1), log=quiet)
    path = out / "checkpoints" / "latest.npz"
    arrays, meta = load_checkpoint(path)
    for group in ("params", "ema"):
        for k in arrays[group]:
            arrays[group][k] = arrays[group][k] * value if np.isfinite(value) else arrays[group][k] + value
    save_checkpoint(path, arrays, meta)
    return out


@pytest.mark.parametrize("command", ["sample", "export"])
def test_issue17_sample_and_export_refuse_a_checkpoint_with_nan_weights(tmp_path, capsys, command):
    out = _poisoned_checkpoint(tmp_path, np.nan)
    capsys.readouterr()
    args = ["--checkpoint", str(out), "--out", str(tmp_path / "o")]
    rc = main([command] + args + (["--n", "2", "--steps", "2"] if command == "sample" else []))
    err = capsys.readouterr().err
    assert rc == 2 and "not finite" in err and "latest.npz" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_issue17_sample_refuses_to_write_non_finite_pixels(tmp_path, capsys):
    out = _poisoned_checkpoint(tmp_path, 1e30)  # finite weights, NaN/inf output
    capsys.readouterr()
    rc = main(["sample", "--checkpoint", str(out), "--out", str(tmp_path / "o"), "--n", "2", "--steps", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "non-finite pixels" in err[-1]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())  # nothing written


def test_issue17_a_run_that_never_saved_starts_again_without_resume(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "samples").mkdir()
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 99, "loss": 1.0}\n')
    train(tiny_cfg(out, steps=2), log=quiet)
    assert [json.loads(s)["step"] for s in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="already holds a run"):  # not a run's files: never touched
        Trainer(tiny_cfg(tmp_path / "mine", steps=2), log=quiet)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "a user's file"


def test_issue17_stale_temp_files_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2), log=quiet)
    stale = out / "checkpoints" / "latest.npz.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    train(tiny_cfg(out, steps=3, resume=True), log=quiet)
    assert not list((out / "checkpoints").glob("*.tmp-*"))


def test_issue17_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    import os

    out = tmp_path / "run"
    train(tiny_cfg(out, steps=2), log=quiet)
    first = Trainer(tiny_cfg(out, steps=4, resume=True), log=quiet)
    with pytest.raises(RuntimeError, match=f"in use by another minidiff process \\(PID {os.getpid()}\\)"):
        Trainer(tiny_cfg(out, steps=4, resume=True), log=quiet)
    first.close()
    second = Trainer(tiny_cfg(out, steps=4, resume=True), log=quiet)  # free again
    second.close()
