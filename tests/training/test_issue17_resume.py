"""Issue 17 items 4, 6 (the log) and 9: checkpoint metadata checked field by field (one line naming the file
and the field, never a KeyError/TypeError traceback), checkpoint members that declare more than they hold
refused before allocation, log.jsonl trimmed to the checkpoint's step on --resume, and the ops setting (table
and CPU shard count) recorded and kept or reported on --resume."""

import json
import zipfile

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.fast.ops import fast_ops
from minidiff.nn.ops import REFERENCE
from minidiff.training.bundle import load_bundle
from minidiff.training.checkpoint import check_member_sizes, load_checkpoint, save_checkpoint
from minidiff.training.config import TrainConfig
from minidiff.training.run_folder import ops_record, recorded_shards, trim_log
from minidiff.training.trainer import Trainer, train

from tiny_runs import quiet, tiny_config


def tiny_cfg(out, **kw):
    return tiny_config(out, **(dict(steps=4, batch_size=2, save_every=2, sample_steps=1, warmup_steps=2) | kw))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step text-conditioned run (the default data): its folder and latest.npz's arrays and meta."""
    out = tmp_path_factory.mktemp("issue17") / "run"
    train(tiny_cfg(out, steps=2), log=quiet)
    arrays, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    return out, arrays, meta


def remove(d, key):
    d.pop(key)


def planted(run, tmp_path, change):
    """A copy of the run whose latest.npz has change(arrays, meta) applied."""
    out, arrays, meta = run
    meta = json.loads(json.dumps(meta))
    arrays = {g: (dict(v) if isinstance(v, dict) else v) for g, v in arrays.items()}
    arrays["opt"] = {k: dict(v) for k, v in arrays["opt"].items()}
    change(arrays, meta)
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "log.jsonl").write_bytes((out / "log.jsonl").read_bytes())
    save_checkpoint(copy / "checkpoints" / "latest.npz", arrays, meta)
    return copy


PRNG = {"bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0}
# (name, change, the field named, whether sample/eval/export read it too (else only --resume))
CASES = [
    ("no_prediction_type", lambda a, m: remove(m["train_config"], "prediction_type"), "prediction_type", True),
    ("unknown_prediction_type", lambda a, m: m["train_config"].update(prediction_type="noise"), "prediction_type", True),
    ("no_conditioning", lambda a, m: remove(m, "conditioning"), "conditioning", True),
    ("unknown_conditioning", lambda a, m: m.update(conditioning="pixels"), "conditioning", True),
    ("no_step", lambda a, m: remove(m, "step"), "step", True),
    ("step_a_string", lambda a, m: m.update(step="2"), "step", True),
    ("no_train_config", lambda a, m: m.update(train_config=[1]), "train_config", True),
    ("timesteps_a_string", lambda a, m: m["train_config"].update(num_train_timesteps="1000"), "num_train_timesteps",
     True),
    ("timesteps_1e12", lambda a, m: m["train_config"].update(num_train_timesteps=10**12), "num_train_timesteps", True),
    ("unknown_beta_schedule", lambda a, m: m["train_config"].update(beta_schedule="cosine!"), "beta_schedule", True),
    ("no_data", lambda a, m: remove(m["train_config"], "data"), "data", True),
    ("model_config_unknown_field", lambda a, m: m["model_config"].update(wings=2), "model_config", True),
    ("model_config_a_list", lambda a, m: m.update(model_config=[]), "model_config", True),
    ("no_tokenizer", lambda a, m: m.update(tokenizer=None), "tokenizer", True),
    ("tokenizer_a_string", lambda a, m: m.update(tokenizer="abc"), "tokenizer", True),
    ("num_classes_negative", lambda a, m: m.update(num_classes=-1), "num_classes", True),
    ("class_names_short", lambda a, m: m.update(class_names=["a"]), "class_names", True),
    ("weights_missing_one", lambda a, m: a["params"].pop("conv_in.weight"), "params/", True),
    ("weights_wrong_shape", lambda a, m: a["params"].update({"conv_in.bias": np.zeros(3, np.float32)}),
     "params/conv_in.bias", True),
    ("weights_strings", lambda a, m: a["ema"].update({"conv_in.bias": np.array(["x"] * 32)}), "ema/conv_in.bias",
     True),
    ("no_rng", lambda a, m: remove(m, "rng"), "rng", False),
    ("rng_unknown_generator", lambda a, m: m.update(rng={**PRNG, "bit_generator": "Dice"}), "rng", False),
    ("rng_wrong_shape", lambda a, m: m.update(rng={**PRNG, "state": [1, 2]}), "rng", False),
    ("rng_float_state", lambda a, m: m.update(rng={**PRNG, "state": {"state": 1.5, "inc": 3}}), "rng", False),
    ("rng_short_key", lambda a, m: m.update(rng={"bit_generator": "MT19937", "state": {"key": [1, 2], "pos": 0}}),
     "rng", False),
    ("losses_short", lambda a, m: m.update(losses=[1.0]), "losses", False),
    ("no_ema_num_updates", lambda a, m: remove(m, "ema_num_updates"), "ema_num_updates", False),
    ("opt_step_a_float", lambda a, m: m.update(opt_step=2.5), "opt_step", False),
    ("ops_malformed", lambda a, m: m.update(ops={"name": "fast"}), "ops", False),
    ("ops_unknown_device", lambda a, m: m.update(ops={"name": "fast", "shards": 1, "device": "tpu"}), "ops", False),
    ("no_adam_moments", lambda a, m: a.pop("opt"), "opt/exp_avg", False),
]


@pytest.mark.parametrize("name, change, field, everywhere", CASES, ids=[c[0] for c in CASES])
def test_issue17_item4_bad_checkpoint_metadata_is_one_line_naming_the_file_and_field(run, tmp_path, name, change,
                                                                                     field, everywhere):
    copy = planted(run, tmp_path, change)
    ckpt = str(copy / "checkpoints" / "latest.npz")
    log_before = (copy / "log.jsonl").read_bytes()
    with pytest.raises(ValueError) as info:  # --resume reads every field
        Trainer(tiny_cfg(copy, resume=True), log=quiet)
    assert field in str(info.value) and ckpt in str(info.value) and "\n" not in str(info.value)
    assert (copy / "log.jsonl").read_bytes() == log_before  # a refused resume changes nothing
    if everywhere:  # and so does sampling (sample, eval and export share load_run)
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            load_bundle(copy)
    else:
        load_bundle(copy)  # what only --resume needs does not stop sampling


@pytest.mark.parametrize("command", ["sample", "train"])
def test_issue17_item4_the_cli_prints_one_line_for_a_checkpoint_without_prediction_type(run, tmp_path, capsys,
                                                                                      command):
    copy = planted(run, tmp_path, lambda a, m: remove(m["train_config"], "prediction_type"))
    argv = (["sample", "--checkpoint", str(copy), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]
            if command == "sample" else
            ["train", "--out", str(copy), "--resume", "--preset", "tiny", "--steps", "4", "--batch-size", "2"])
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "Traceback" not in err[0]
    assert "prediction_type" in err[0] and "latest.npz" in err[0]


def npz_with_header(path, name, shape, body=b"\0" * 64):
    """An .npz whose member `name` declares shape float32 in its .npy header but holds only `body`."""
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open(name + ".npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(body)
        with zf.open("__meta__.npy", "w") as f:
            np.lib.format.write_array(f, np.array(json.dumps({"checkpoint_format": 1})))
    return path


def test_issue17_item4_a_member_declaring_1_tib_is_refused_before_allocation(tmp_path, monkeypatch, capsys):
    path = npz_with_header(tmp_path / "latest.npz", "params/conv_in.weight", (2 ** 38,))  # 1 TiB of float32
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("np.load ran: the header was not checked first"))
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg and "params/conv_in.weight" in msg and "1,099,511,627,776 bytes" in msg
    assert "\n" not in msg
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["sample", "--checkpoint", str(path), "--n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "params/conv_in.weight" in err[0]


def test_issue17_item4_checkpoint_members_over_the_cap_in_all_are_refused(run):
    out, _, _ = run
    latest = out / "checkpoints" / "latest.npz"
    check_member_sizes(latest)  # a real checkpoint passes
    with pytest.raises(ValueError, match="the cap is 100,000 in all"):
        check_member_sizes(latest, cap=100_000)


def test_issue17_item6_resume_trims_the_log_to_the_checkpoint_step(tmp_path):
    full = tmp_path / "full"
    train(tiny_cfg(full, steps=6), log=quiet)
    out = tmp_path / "killed"
    train(tiny_cfg(out, steps=6), stop_after=4, log=quiet)  # checkpoint at step 4
    log = out / "log.jsonl"
    # what a kill after step 5's log line and during step 6's leaves: lines after the checkpoint, half a line
    log.write_bytes(log.read_bytes() + b'{"step": 5, "loss": 9.0}\n{"step": 6, "lo')
    (out / "log.jsonl.tmp-999999").write_bytes(b"a killed trim")
    train(tiny_cfg(out, steps=6, resume=True), log=quiet)
    records = [json.loads(s) for s in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    reference = [json.loads(s) for s in (full / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == [r["loss"] for r in reference]  # the planted 9.0 is gone
    assert not list(tmp_path.glob("killed/*.tmp-*"))


def test_killed_picture_writes_are_removed_at_the_next_start(tmp_path):
    """loss.png and the preview grids are written through a temporary file too: a kill during one leaves
    loss.png.tmp-<pid> or samples/step_XXXXXX.png.tmp-<pid>, which the next start (a resume, or a new start of a
    folder that never saved) removes, and which does not make the folder look foreign."""
    resumed, fresh = tmp_path / "resumed", tmp_path / "fresh"
    train(tiny_cfg(resumed, steps=4), stop_after=2, log=quiet)  # a checkpoint at step 2
    (fresh / "samples").mkdir(parents=True)  # a folder whose run was killed before its first save
    for out, resume in ((resumed, True), (fresh, False)):
        planted = [out / "loss.png.tmp-999999", out / "samples" / "step_000003.png.tmp-999999"]
        for p in planted:
            p.write_bytes(b"a killed picture")
        train(tiny_cfg(out, steps=4, resume=resume), log=quiet)
        assert not any(p.exists() for p in planted) and (out / "loss.png").exists(), out


def test_issue17_item6_trim_log_is_atomic_and_keeps_a_matching_log_untouched(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = b'{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n{"step": 2, "eval_accuracy": 0.5}\n'
    log.write_bytes(lines)
    inode = log.stat().st_ino
    assert trim_log(log, 2) == 0 and log.read_bytes() == lines and log.stat().st_ino == inode  # nothing rewritten
    log.write_bytes(lines + b'{"step": 3, "loss": 0.2}\nnot json\n{"step": true}\n{"step": 4')
    assert trim_log(log, 2) == 4 and log.read_bytes() == lines
    assert trim_log(tmp_path / "missing.jsonl", 2) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]  # no temp file left


def test_issue17_item9_the_ops_and_shard_count_are_recorded(tmp_path):
    out = tmp_path / "fast"
    train(tiny_cfg(out, steps=2), ops=fast_ops(3, "threads"), log=quiet)
    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta["ops"] == {"name": "fast", "shards": 3, "device": "cpu"}
    assert json.loads((out / "config.json").read_text())["ops"] == {"name": "fast", "shards": 3, "device": "cpu"}
    assert recorded_shards(out) == 3
    assert ops_record(REFERENCE) == {"name": "reference", "shards": 1, "device": "cpu"}
    assert recorded_shards(tmp_path / "nothing") == 0


def test_issue17_item9_resume_with_other_ops_says_so_in_one_line(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=6), stop_after=2, ops=fast_ops(2, "threads"), log=quiet)
    for ops, steps, said in [(fast_ops(2, "threads"), 3, None), (fast_ops(1, "threads"), 4, "pass --threads 2"),
                             (REFERENCE, 5, "drop --reference")]:
        lines = []
        train(tiny_cfg(out, steps=6, resume=True), stop_after=1, ops=ops, log=lines.append)
        notes = [s for s in lines if "bit-exact" in s]
        assert len(notes) == (said is not None), lines
        if said:
            assert said in notes[0] and "\n" not in notes[0]
        _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
        assert meta["step"] == steps and meta["ops"] == ops_record(ops)  # the setting of the newest save


def test_issue17_item9_cli_resume_with_threads_0_keeps_the_recorded_shard_count(tmp_path, capsys):
    common = ["--preset", "tiny", "--batch-size", "3", "--save-every", "2", "--sample-every", "0", "--sample-steps",
              "1", "--log-every", "1", "--warmup-steps", "2", "--shards", "threads"]
    whole = tmp_path / "whole"
    assert main(["train", *common, "--steps", "4", "--threads", "3", "--out", str(whole)]) == 0
    out = tmp_path / "resumed"
    assert main(["train", *common, "--steps", "2", "--threads", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", *common, "--steps", "4", "--resume", "--out", str(out)]) == 0  # --threads 0 (auto)
    assert "bit-exact" not in capsys.readouterr().out
    a, meta_a = load_checkpoint(whole / "checkpoints" / "latest.npz")
    b, meta_b = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert meta_b["ops"] == {"name": "fast", "shards": 3, "device": "cpu"} and meta_b["losses"] == meta_a["losses"]
    for k in a["params"]:
        np.testing.assert_array_equal(b["params"][k], a["params"][k])
    assert main(["train", *common, "--steps", "5", "--resume", "--threads", "1", "--out", str(out)]) == 0
    notes = [s for s in capsys.readouterr().out.splitlines() if "bit-exact" in s]
    assert len(notes) == 1 and "3 CPU shard(s)" in notes[0] and "--threads 3" in notes[0]


@pytest.mark.parametrize("change, field", [
    (lambda m: remove(m, "num_classes"), "num_classes"),
    (lambda m: m.update(num_classes="10"), "num_classes"),
    (lambda m: remove(m["train_config"], "beta_schedule"), "train_config.beta_schedule"),
    (lambda m: m.update(model_config=None), "model_config"),
    (lambda m: m.update(class_names=[1, 2]), "class_names"),
])
def test_issue17_item4_bad_classifier_metadata_is_one_line_naming_the_field(tmp_path, change, field):
    from minidiff.training.classifier import ClassifierTrainConfig, load_classifier, train_classifier

    out = tmp_path / "clf"
    train_classifier(ClassifierTrainConfig(out=str(out), preset="tiny", steps=1, batch_size=2), log=quiet)
    path = out / "checkpoints" / "latest.npz"
    load_classifier(path)
    arrays, meta = load_checkpoint(path)
    change(meta)
    save_checkpoint(path, arrays, meta)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")) as info:
        load_classifier(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_config_json_records_the_latest_starts_settings_after_a_resume(tmp_path):
    """config.json is the run's settings as of its latest start, like the checkpoint's: after a --resume with other
    ops (or more steps) it names them, not the first start's (the notice said the ops differ)."""
    out = tmp_path / "run"
    train(tiny_cfg(out, steps=4), stop_after=2, ops=fast_ops(3, "threads"), log=quiet)
    assert json.loads((out / "config.json").read_text())["ops"] == {"name": "fast", "shards": 3, "device": "cpu"}
    train(tiny_cfg(out, steps=5, resume=True), stop_after=1, ops=fast_ops(1, "threads"), log=quiet)
    saved = json.loads((out / "config.json").read_text())
    _, meta = load_checkpoint(out / "checkpoints" / "latest.npz")
    assert saved["ops"] == meta["ops"] == {"name": "fast", "shards": 1, "device": "cpu"}
    assert saved["train_config"]["steps"] == 5 and saved["train_config"] == meta["train_config"]
    assert sorted(p.name for p in out.iterdir() if ".tmp-" in p.name) == []


def test_the_resume_notice_on_a_gpu_does_not_suggest_threads(tmp_path, monkeypatch):
    """A CPU run in 2 shards resumed on a GPU (fake CuPy; the batch runs whole, --threads does nothing there): the
    notice names the GPU and advises resuming on the CPU, not `pass --threads 2`; on the CPU it still says that."""
    import shutil

    import fake_cupy

    out, cpu = tmp_path / "run", tmp_path / "cpu"
    train(tiny_cfg(out, steps=6), stop_after=2, ops=fast_ops(2, "threads"), log=quiet)
    shutil.copytree(out, cpu)
    fake_cupy.install(monkeypatch)
    lines = []
    train(tiny_cfg(out, steps=6, resume=True, device="gpu"), stop_after=1, ops=fast_ops(1, "threads"),
          log=lines.append)
    notes = [s for s in lines if "bit-exact" in s]
    assert len(notes) == 1 and "\n" not in notes[0], lines
    assert "pass --threads" not in notes[0] and "--device cpu --threads 2" in notes[0] and "GPU" in notes[0]
    monkeypatch.undo()
    lines = []
    train(tiny_cfg(cpu, steps=6, resume=True), stop_after=1, ops=fast_ops(1, "threads"), log=lines.append)
    notes = [s for s in lines if "bit-exact" in s]
    assert len(notes) == 1 and "pass --threads 2" in notes[0] and "GPU" not in notes[0]
