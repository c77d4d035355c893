"""The table of the bad-input suite (tests/test_bad_inputs.py): one Case per hostile file, flag or path.

A case's build(work, fx) writes its inputs into the empty folder `work` (the command's working directory;
fx copies the session's trained runs in) and returns the argv of `minidiff` (a list) or a library call
({"call": "module:function", "args": [...]}). The command must exit with `code` (one of them, for a tuple),
print exactly one line on stderr holding every string of `says`, and leave `work` unchanged (but for the names
in `writes`, checked by `after`).
Exit statuses (minidiff --help): 1 diverged / non-finite, 2 bad input, 3 OS error, 4 out of memory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

import bad_inputs_files as F


@dataclass
class Case:
    id: str
    command: str  # train, sample, ..., or "data" / "load_pretrained" for the loaders' own cases
    build: Callable
    code: int | tuple = 2
    says: tuple = ()
    timeout: float = 60.0
    subprocess: bool = False  # run as a real `python -m minidiff` (the rest go through the fork server)
    needs_non_root: str = ""  # a reason: skipped when root (permission bits do not stop root)
    progress_ok: bool = False  # stderr may hold progress-bar lines before the one error line (training ran)
    writes: tuple = ()  # top-level names in the case folder the command may create or change (a diverged run's own)
    fsize: int = 0  # RLIMIT_FSIZE: a file past this many bytes fails with EFBIG (a full disk, for one command)
    after: Callable | None = None  # after(work): what must hold of what the command was allowed to write


CASES: list[Case] = []
TRAIN = ["--out", "run", "--steps", "1", "--batch-size", "2", "--preset", "tiny", "--sample-every", "0",
         "--threads", "1"]
SAMPLE = ["--n", "2", "--steps", "2", "--threads", "1", "--out", "samples"]


def add(id, command, build, code=2, says=(), **kw):
    CASES.append(Case(id, command, build, code, tuple(says), **kw))


def flag(id, argv, code=2, says=(), **kw):
    """A case that needs no files: argv as given."""
    command = argv[0] if argv and not argv[0].startswith("frob") else "(none)"
    add(id, command, lambda work, fx, a=list(argv): a, code, says, timeout=30, **kw)


# ============================================================================ flags (argparse and validation)

flag("no-command", [], says=["required"])
flag("unknown-command", ["frobnicate"], says=["frobnicate"])
flag("train-unknown-flag", ["train", "--frob", "1"], says=["--frob"])
flag("train-steps-not-int", ["train", "--steps", "abc"], says=["--steps"])
flag("train-batch-float", ["train", "--batch-size", "1.5"], says=["--batch-size"])
flag("train-lr-not-float", ["train", "--lr", "fast"], says=["--lr"])
add("sample-sampler-unknown", "sample", lambda w, fx: [*_sample(w, fx), "--sampler", "bogus"], says=["bogus"])
flag("eval-sampler-choice", ["eval", "--checkpoint", "c", "--sampler", "bogus"], says=["--sampler"])
flag("eval-device-choice", ["eval", "--checkpoint", "c", "--device", "tpu"], says=["--device"])
flag("eval-missing-checkpoint", ["eval"], says=["--checkpoint"])
flag("eval-n-per-class-not-int", ["eval", "--checkpoint", "c", "--n-per-class", "x"], says=["--n-per-class"])
flag("fixtures-only-choice", ["fixtures", "--out", "fx", "--only", "bogus"], says=["--only"])
flag("fixtures-missing-out", ["fixtures"], says=["--out"])
flag("bench-preset-choice", ["bench", "--preset", "bogus"], says=["--preset"])
flag("oracle-precision-choice", ["oracle", "--adapter", "m:o", "--precision", "bogus"], says=["--precision"])
flag("export-missing-out", ["export", "--checkpoint", "c"], says=["--out"])
flag("train-classifier-steps-float", ["train-classifier", "--steps", "1e3"], says=["--steps"])
for name, value in (("dtype", "float16"), ("device", "tpu"), ("beta-schedule", "bogus"), ("conditioning", "bogus"),
                    ("prediction-type", "bogus"), ("optimizer", "sgd"), ("lr-schedule", "bogus"),
                    ("variance-type", "bogus"), ("shards", "bogus"), ("preset", "huge")):
    flag(f"train-{name}-{value}", ["train", f"--{name}", value, "--out", "run"], says=[value])
add("sample-dtype-float16", "sample", lambda w, fx: [*_sample(w, fx), "--dtype", "float16"], says=["float16"])
flag("train-classifier-preset-huge", ["train-classifier", "--preset", "huge", "--out", "run"], says=["huge"])

for name, value, says in (("lr", "nan", "--lr"), ("lr", "inf", "--lr"), ("lr", "-1", "--lr"), ("lr", "0", "--lr"),
                          ("weight-decay", "nan", "--weight-decay"), ("weight-decay", "-1", "--weight-decay"),
                          ("grad-clip", "nan", "--grad-clip"), ("grad-clip", "-inf", "--grad-clip"),
                          ("ema-decay", "1.0", "--ema-decay"), ("ema-decay", "-0.1", "--ema-decay"),
                          ("ema-decay", "nan", "--ema-decay"), ("dropout", "1.5", "--dropout"),
                          ("dropout", "nan", "--dropout"), ("snr-gamma", "-1", "--snr-gamma"),
                          ("snr-gamma", "nan", "--snr-gamma"), ("vlb-weight", "nan", "--vlb-weight"),
                          ("vlb-weight", "-1", "--vlb-weight"), ("p-uncond", "1.5", "--p-uncond"),
                          ("p-uncond", "nan", "--p-uncond"), ("epochs", "nan", "--epochs"),
                          ("epochs", "-1", "--epochs"), ("epochs", "inf", "--epochs"),
                          ("guidance-scale", "nan", "--guidance-scale"), ("guidance-scale", "inf", "--guidance-scale"),
                          ("steps", "-1", "--steps"), ("steps", "0", "--steps"), ("batch-size", "0", "--batch-size"),
                          ("resolution", "0", "--resolution"), ("resolution", "100000", "--resolution"),
                          ("save-every", "-1", "--save-every"), ("log-every", "0", "--log-every"),
                          ("sample-steps", "0", "--sample-steps"), ("threads", "-1", "--threads"),
                          ("max-prompt-len", "0", "--max-prompt-len"),
                          ("gradient-accumulation-steps", "0", "--gradient-accumulation-steps"),
                          ("checkpoints-total-limit", "-5", "--checkpoints-total-limit"),
                          ("eval-every", "-1", "--eval-every"), ("num-train-timesteps", "0", "--num-train-timesteps"),
                          ("num-train-timesteps", "1000000000", "--num-train-timesteps"),
                          ("warmup-steps", "-1", "--warmup-steps")):
    flag(f"train--{name}={value}", ["train", f"--{name}", value, "--out", "run"], says=[says])

for name, value in (("guidance-scale", "nan"), ("guidance-scale", "inf"), ("guidance-scale", "-inf"),
                    ("guidance-rescale", "nan"), ("guidance-rescale", "-0.1"), ("guidance-rescale", "2"),
                    ("eta", "nan"), ("eta", "-1"), ("eta", "inf"), ("classifier-scale", "nan"),
                    ("classifier-scale", "inf"), ("beta-start", "nan"), ("beta-start", "-1"), ("beta-end", "inf"),
                    ("beta-end", "2"), ("class", "-5"), ("n", "0"), ("n", "-1"), ("steps", "0"), ("steps", "-3"),
                    ("threads", "-1"), ("num-train-timesteps", "-1")):
    add(f"sample--{name}={value}", "sample", lambda w, fx, n=name, v=value: [*_sample(w, fx), f"--{n}", v],
        says=[f"--{name}"])

for name, value in (("lr", "nan"), ("lr", "-1"), ("lr", "0"), ("weight-decay", "nan"), ("weight-decay", "-1"),
                    ("grad-clip", "nan"), ("grad-clip", "-1"), ("steps", "0"), ("batch-size", "-2"),
                    ("num-train-timesteps", "0"), ("beta-schedule", "bogus")):
    flag(f"train-classifier--{name}={value}", ["train-classifier", f"--{name}", value, "--out", "run"],
         says=[f"--{name}"])

for value in ("nan", "inf", "-inf", "1e400", "-1e400"):  # -inf once read as an option ("unrecognized arguments")
    flag(f"eval--scales={value}", ["eval", "--checkpoint", "c", "--scales", "1", value, "--out", "o"],
         says=["--scales", "finite"])
    flag(f"eval--scales={value}-alone", ["eval", "--checkpoint", "c", "--scales", value, "--out", "o"],
         says=["--scales", "finite"])
flag("train--lr=-inf", ["train", "--lr", "-inf", "--out", "run"], says=["--lr", "finite"])  # was: expected one argument
for name, value in (("n-per-class", "0"), ("n-per-class", "-1"), ("steps", "0"), ("threads", "-1")):
    add(f"eval--{name}={value}", "eval",
        lambda work, fx, n=name, v=value: ["eval", "--checkpoint", fx.copy("run", work), "--out", "o", f"--{n}", v],
        says=[f"--{name}"])
for name, value in (("n", "0"), ("batch-size", "0"), ("nll-timesteps", "-1")):
    add(f"eval-nll--{name}={value}", "eval",
        lambda work, fx, n=name, v=value: ["eval", "--checkpoint", fx.copy("run", work), "--nll", "--out", "o", f"--{n}", v],
        says=[f"--{name}"])
flag("bench-batch-0", ["bench", "--batch", "0", "--no-torch", "--preset", "tiny"], says=["--batch"])
flag("bench-repeats-0", ["bench", "--repeats", "0", "--no-torch", "--preset", "tiny"], says=["--repeats"])
flag("bench-image-size-neg", ["bench", "--image-size", "-8", "--no-torch", "--preset", "tiny"], says=["--image-size"])
flag("oracle-adapter-no-colon", ["oracle", "--adapter", "nocolon"], says=["nocolon"])
flag("oracle-adapter-missing-module", ["oracle", "--adapter", "no_such_module_xyz:adapter"],
     says=["no_such_module_xyz"])
flag("oracle-adapter-missing-object", ["oracle", "--adapter", "json:no_such_object"], says=["no_such_object"])
flag("train-bad-flag-subprocess", ["train", "--lr", "nan", "--out", "run"], says=["--lr"], subprocess=True)
flag("sample-bad-int-subprocess", ["sample", "--n", "many"], says=["--n"], subprocess=True)

# ============================================================================ paths


def _file(work: Path, name: str = "file") -> Path:
    (work / name).write_text("not a folder\n")
    return work / name


add("train-out-under-a-file", "train", lambda w, fx: (_file(w), ["train", *TRAIN[2:], "--out", "file/run"])[1],
    code=3, says=["file"])
add("train-out-is-a-file", "train", lambda w, fx: (_file(w), ["train", *TRAIN[2:], "--out", "file"])[1],
    code=(2, 3), says=["file"])
add("train-data-missing", "train", lambda w, fx: ["train", *TRAIN, "--data", "nowhere"], says=["nowhere"])
add("train-data-empty-folder", "train", lambda w, fx: ((w / "empty").mkdir(), ["train", *TRAIN, "--data", "empty"])[1],
    says=["empty"])
add("train-data-unknown-file", "train", lambda w, fx: (_file(w, "x.txt"), ["train", *TRAIN, "--data", "x.txt"])[1],
    says=["x.txt"])
add("train-existing-run-without-resume", "train", lambda w, fx: [*_run_argv(w, fx)], says=["run"])
add("train-resume-without-checkpoint", "train", lambda w, fx: ((w / "run").mkdir(), ["train", *TRAIN, "--resume"])[1],
    says=["--resume"])
add("train-resume-other-preset", "train", lambda w, fx: [*_resume(w, fx), "--preset", "small"], says=["preset"])


def _unwritable(work: Path, argv_tail) -> list:
    (work / "ro").mkdir()
    os.chmod(work / "ro", 0o555)
    return argv_tail


add("train-out-unwritable", "train", lambda w, fx: _unwritable(w, ["train", *TRAIN[2:], "--out", "ro/run"]),
    code=3, says=["ro"], needs_non_root="running as root: permission bits do not stop root")
add("sample-out-unwritable", "sample",
    lambda w, fx: _unwritable(w, ["sample", "--checkpoint", fx.copy("run", w), *SAMPLE[:-1], "ro/s"]),
    code=3, says=["ro"], needs_non_root="running as root: permission bits do not stop root")
add("sample-checkpoint-missing", "sample", lambda w, fx: ["sample", "--checkpoint", "nowhere", *SAMPLE],
    says=["nowhere"])
add("sample-checkpoint-empty-folder", "sample",
    lambda w, fx: ((w / "e").mkdir(), ["sample", "--checkpoint", "e", *SAMPLE])[1], says=["e"])
add("sample-checkpoint-text-file", "sample",
    lambda w, fx: (_file(w, "c.txt"), ["sample", "--checkpoint", "c.txt", *SAMPLE])[1], says=["c.txt"])
add("sample-checkpoint-pickle-pt", "sample",
    lambda w, fx: ((w / "model.pt").write_bytes(__import__("pickle").dumps(F.Payload())),
                   ["sample", "--checkpoint", "model.pt", *SAMPLE])[1], says=["model.pt"])
add("sample-out-under-a-file", "sample",
    lambda w, fx: (_file(w), ["sample", "--checkpoint", fx.copy("run", w), *SAMPLE[:-1], "file/s"])[1],
    code=3, says=["file"])
add("sample-noise-missing", "sample", lambda w, fx: [*_sample(w, fx), "--noise", "nowhere.npy"], says=["nowhere.npy"])
add("sample-noise-is-a-folder", "sample", lambda w, fx: ((w / "d.npy").mkdir(), [*_sample(w, fx), "--noise", "d.npy"])[1],
    code=(2, 3), says=["d.npy"])
add("sample-noise-not-npy", "sample", lambda w, fx: (_file(w, "n.npy"), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["n.npy"])
add("sample-noise-int", "sample",
    lambda w, fx: (np.save(w / "n.npy", np.zeros((2, 3, 16, 16), np.int64)), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["n.npy"])
add("sample-noise-wrong-shape", "sample",
    lambda w, fx: (np.save(w / "n.npy", np.zeros((5, 1, 3, 3))), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["noise"])
add("sample-noise-nan", "sample",
    lambda w, fx: (np.save(w / "n.npy", np.full((2, 3, 16, 16), np.nan)), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["noise"])
add("sample-noise-object-payload", "sample",
    lambda w, fx: (np.save(w / "n.npy", F.object_array(), allow_pickle=True), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["n.npy"])
add("sample-classifier-missing", "sample", lambda w, fx: [*_sample(w, fx), "--classifier", "nowhere"],
    says=["nowhere"])
add("sample-classifier-is-diffusion-run", "sample",
    lambda w, fx: [*_sample(w, fx), "--classifier", "run"], says=["run"])
add("sample-checkpoint-is-classifier", "sample",
    lambda w, fx: ["sample", "--checkpoint", fx.copy("classifier", w), *SAMPLE], says=["classifier"])
add("sample-class-99", "sample", lambda w, fx: [*_sample(w, fx), "--class", "99"], says=["--class"])
add("sample-prompt-on-class-model", "sample", lambda w, fx: [*_sample(w, fx), "--prompt", "red circle"],
    says=["--class"])
add("sample-unknown-word", "sample",
    lambda w, fx: ["sample", "--checkpoint", fx.copy("text_run", w), *SAMPLE, "--prompt", "purple zebra"],
    says=["zebra"])
add("sample-steps-past-T", "sample", lambda w, fx: [*_sample(w, fx), "--steps", "5000"], says=["5000"])
add("sample-scheduler-flag-on-a-run", "sample", lambda w, fx: [*_sample(w, fx), "--beta-schedule", "linear"],
    says=["--beta-schedule"])
add("sample-n-huge", "sample", lambda w, fx: [*_sample(w, fx), "--n", "100000000"], says=["--n"])
add("eval-n-per-class-huge", "eval", lambda w, fx: ["eval", "--checkpoint", fx.copy("run", w), "--out", "o",
                                                    "--n-per-class", "100000000"], says=["--n-per-class"])
add("eval-checkpoint-missing", "eval", lambda w, fx: ["eval", "--checkpoint", "nowhere", "--out", "o"],
    says=["nowhere"])
add("eval-out-under-a-file", "eval", lambda w, fx: (_file(w), ["eval", "--checkpoint", fx.copy("run", w), "--out", "file/o"])[1],
    code=3, says=["file"])
add("eval-nll-data-missing", "eval", lambda w, fx: ["eval", "--checkpoint", fx.copy("run", w), "--nll", "--data", "nowhere", "--out", "o"],
    says=["nowhere"])
add("export-checkpoint-missing", "export", lambda w, fx: ["export", "--checkpoint", "nowhere", "--out", "p"],
    says=["nowhere"])
add("export-out-under-a-file", "export",
    lambda w, fx: (_file(w), ["export", "--checkpoint", fx.copy("run", w), "--out", "file/p"])[1],
    code=3, says=["file"])
add("export-out-nonempty-folder", "export",
    lambda w, fx: ((w / "p").mkdir(), _file(w / "p", "mine.txt"),
                   ["export", "--checkpoint", fx.copy("run", w), "--out", "p"])[2], says=["p"])
add("fixtures-out-under-a-file", "fixtures", lambda w, fx: (_file(w), ["fixtures", "--out", "file/fx"])[1],
    code=3, says=["file"])
add("fixtures-out-is-a-file", "fixtures", lambda w, fx: (_file(w), ["fixtures", "--out", "file"])[1],
    code=(2, 3), says=["file"])
add("train-classifier-data-missing", "train-classifier",
    lambda w, fx: ["train-classifier", "--data", "nowhere", "--out", "run", "--preset", "tiny", "--steps", "1"],
    says=["nowhere"])
add("train-classifier-unlabelled-data", "train-classifier",
    lambda w, fx: ((w / "flat").mkdir(), F.png(w / "flat" / "a.png"), F.png(w / "flat" / "b.png"),
                   ["train-classifier", "--data", "flat", "--out", "run", "--preset", "tiny", "--steps", "1"])[-1],
    says=["label"])
add("train-classifier-out-under-a-file", "train-classifier",
    lambda w, fx: (_file(w), ["train-classifier", "--out", "file/run", "--preset", "tiny", "--steps", "1",
                              "--batch-size", "2"])[1], code=3, says=["file"])
add("train-out-under-a-file-subprocess", "train",
    lambda w, fx: (_file(w), ["train", *TRAIN[2:], "--out", "file/run"])[1], code=3, says=["file"], subprocess=True)


def _run_argv(work: Path, fx) -> list:
    fx.copy("run", work)
    return ["train", *TRAIN, "--conditioning", "class"]


def _resume(work: Path, fx) -> list:
    return _run_argv(work, fx) + ["--resume", "--steps", "3"]


def _sample(work: Path, fx) -> list:
    return ["sample", "--checkpoint", fx.copy("run", work), *SAMPLE]


# ============================================================================ data files (train --data X)


def data_case(id, make, says=None, code=2, command="train", **kw):
    """make(work) writes the data and returns its path (relative to work); train on it must fail."""
    def build(work, fx):
        spec = make(work)
        if command == "train-classifier":
            return ["train-classifier", "--data", spec, "--out", "run", "--preset", "tiny", "--steps", "1",
                    "--batch-size", "2"]
        return ["train", *TRAIN, "--data", spec]
    add(id, command, build, code, says if says is not None else [id.split(":")[0]], **kw)


def _npz(name, **arrays):
    def make(work):
        np.savez(work / name, **arrays)
        return name
    return make


def _bytes(name, data: bytes):
    def make(work):
        (work / name).write_bytes(data)
        return name
    return make


IM = F.images()
data_case("empty.npz", _bytes("empty.npz", b""))
data_case("junk.npz", _bytes("junk.npz", b"not a zip at all" * 10))
data_case("truncated.npz", lambda w: (np.savez(w / "truncated.npz", images=F.images(64)),
                                       F.truncate(w / "truncated.npz"), "truncated.npz")[2])
data_case("noimages.npz", _npz("noimages.npz", pictures=IM))
data_case("extrakey.npz", _npz("extrakey.npz", images=IM, extra=np.zeros(4)))
data_case("int32.npz", _npz("int32.npz", images=IM.astype(np.int32)))
data_case("nan.npz", _npz("nan.npz", images=np.full((4, 8, 8), np.nan)))
data_case("range.npz", _npz("range.npz", images=IM.astype(np.float32) * 2))
data_case("ndim1.npz", _npz("ndim1.npz", images=np.zeros(16, np.uint8)))
data_case("zero.npz", _npz("zero.npz", images=np.zeros((0, 8, 8), np.uint8)))
data_case("channels5.npz", _npz("channels5.npz", images=np.zeros((4, 5, 8, 7), np.uint8)))
data_case("label-2**40.npz", _npz("label-2**40.npz", images=IM, labels=np.array([0, 1, 2**40, 3])),
          says=["label-2**40.npz", "1099511627776"])
data_case("label-100000.npz", _npz("label-100000.npz", images=IM, labels=np.array([0, 1, 100000, 3])),
          says=["label-100000.npz", "100000"])
data_case("label-neg.npz", _npz("label-neg.npz", images=IM, labels=np.array([0, -1, 2, 3])), says=["label-neg.npz"])
data_case("label-float.npz", _npz("label-float.npz", images=IM, labels=np.array([0.0, 1, 2, 3])))
data_case("label-len.npz", _npz("label-len.npz", images=IM, labels=np.array([0, 1])))
data_case("names-count.npz", _npz("names-count.npz", images=IM, labels=np.array([0, 1, 1, 0]),
                                  class_names=np.array(["a", "b", "c"])))
data_case("names-int.npz", _npz("names-int.npz", images=IM, labels=np.array([0, 1, 1, 0]), class_names=np.array([5, 6])))
data_case("huge-member.npz", lambda w: (F.npz_declaring(w / "huge-member.npz", "images", (2**40,)), "huge-member.npz")[1],
          says=["huge-member.npz", "MAX_DATA_BYTES"])
data_case("huge-labels.npz", lambda w: (F.npz_declaring(w / "huge-labels.npz", "labels", (2**38,), "<i8",
                                                         extra={"images": IM}), "huge-labels.npz")[1],
          says=["huge-labels.npz", "MAX_DATA_BYTES"])
data_case("object-payload.npz", lambda w: (np.savez(w / "object-payload.npz", images=F.object_array()),
                                            "object-payload.npz")[1])
data_case("object-labels.npz", lambda w: (np.savez(w / "object-labels.npz", images=IM, labels=F.object_array()),
                                           "object-labels.npz")[1])
data_case("huge-name-count.npz", _npz("huge-name-count.npz", images=IM, labels=np.array([0, 1, 2, 3]),
                                      class_names=np.array([f"c{i}" for i in range(20000)])))


def _folder(name, files):
    """files: {relative path: writer(path)}."""
    def make(work):
        for rel, write in files.items():
            p = work / name / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            write(p)
        return name
    return make


ok = F.png
data_case("bomb-50000:png", _folder("bombdir", {"a.png": ok, "bomb.png": lambda p: F.png_header(p, 50000, 50000)}),
          says=["bomb.png"])
data_case("bomb-15000:png", _folder("bigdir", {"a.png": ok, "big.png": lambda p: F.png_header(p, 15000, 15000)}),
          says=["big.png"])
data_case("bomb-wide:png", _folder("widedir", {"a.png": ok, "wide.png": lambda p: F.png_header(p, 2**31 - 1, 1)}),
          says=["wide.png"])
data_case("ztxt-bomb:png", _folder("ztxtdir", {"a.png": ok, "z.png": F.png_ztxt_bomb}), says=["z.png"])
data_case("empty:png", _folder("emptypng", {"a.png": ok, "e.png": lambda p: p.write_bytes(b"")}), says=["e.png"])
data_case("truncated:png", _folder("truncpng", {"a.png": ok, "t.png": lambda p: F.truncate(F.png(p, 64), 0.3)}),
          says=["t.png"])
data_case("text-as:png", _folder("textpng", {"a.png": ok, "x.png": lambda p: p.write_text("hello")}), says=["x.png"])
data_case("truncated:jpeg", _folder("truncjpg", {"a.jpg": lambda p: F.png(p, 64),
                                                 "t.jpg": lambda p: F.truncate(F.png(p, 64), 0.4)}), says=["t.jpg"])
data_case("wrong-magic:jpeg", _folder("magicjpg", {"a.jpg": lambda p: F.png(p, 8),
                                                   "m.jpg": lambda p: p.write_bytes(b"\xff\xd9" + b"\0" * 200)}),
          says=["m.jpg"])
data_case("mixed-sizes:png", _folder("mixed", {"a.png": lambda p: F.png(p, 8), "b.png": lambda p: F.png(p, 12)}),
          says=["--resolution"])
data_case("empty-class:png", _folder("classes", {"cat/a.png": ok, "dog/.keep": lambda p: p.write_text("")}),
          says=["dog"])
data_case("bomb-in-class:png", _folder("classbomb", {"cat/a.png": ok,
                                                      "dog/bomb.png": lambda p: F.png_header(p, 50000, 50000)}),
          says=["bomb.png"])
data_case("png-huge-total:png", _folder("manybig", {f"i{i}.png": (lambda p: F.png_header(p, 12000, 12000))
                                                    for i in range(24)}), says=["manybig"])

IDX_IMG, IDX_LAB = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
data_case("idx-empty", _bytes(IDX_IMG, b""), says=[IDX_IMG])
data_case("idx-magic", _bytes(IDX_IMG, b"\x12\x34\x08\x03" + b"\0" * 100), says=[IDX_IMG])
data_case("idx-float-type", _bytes(IDX_IMG, F.idx([2, 2, 2], b"\0" * 32, kind=0x0D)), says=[IDX_IMG])
data_case("idx-ndim-2", _bytes(IDX_IMG, F.idx([4, 4], b"\0" * 16)), says=[IDX_IMG])
data_case("idx-tebibyte", _bytes(IDX_IMG, F.idx([2**20, 2**10, 2**10])), says=[IDX_IMG, "MAX_DATA_BYTES"])
data_case("idx-negative-dim", _bytes(IDX_IMG, F.idx([-4, 8, 8])), says=[IDX_IMG])
data_case("idx-truncated-body", _bytes(IDX_IMG, F.idx([4, 8, 8], b"\0" * 100)), says=[IDX_IMG])
data_case("idx-gz-tebibyte", _bytes(IDX_IMG + ".gz", __import__("gzip").compress(F.idx([2**20, 2**10, 2**10]))),
          says=[IDX_IMG, "MAX_DATA_BYTES"])
data_case("idx-gz-bomb", _bytes(IDX_IMG + ".gz", F.gzip_bomb(F.idx([2, 8, 8], b"\0" * 128))), says=[IDX_IMG])
data_case("idx-gz-corrupt", lambda w: ((w / (IDX_IMG + ".gz")).write_bytes(
    __import__("gzip").compress(F.idx([4, 8, 8], b"\1" * 256))[:-30] + b"garbage!" * 4), IDX_IMG + ".gz")[1],
    says=[IDX_IMG])
data_case("idx-labels-count", _folder("mnist1", {IDX_IMG: lambda p: p.write_bytes(F.idx([4, 8, 8], b"\0" * 256)),
                                                 IDX_LAB: lambda p: p.write_bytes(F.idx([3], b"\0" * 3))}),
          says=[IDX_LAB])
data_case("idx-labels-tebibyte", _folder("mnist2", {IDX_IMG: lambda p: p.write_bytes(F.idx([4, 8, 8], b"\0" * 256)),
                                                    IDX_LAB: lambda p: p.write_bytes(F.idx([2**40 // 2**10, 2**10]))}),
          says=[IDX_LAB])
data_case("idx-labels-gz-bomb", _folder("mnist3", {IDX_IMG: lambda p: p.write_bytes(F.idx([4, 8, 8], b"\0" * 256)),
                                                   IDX_LAB + ".gz": lambda p: p.write_bytes(
                                                       F.gzip_bomb(F.idx([4], b"\0" * 4)))}), says=[IDX_LAB])

CIFAR = "data_batch_1"
data_case("cifar-empty", _folder("c1", {CIFAR: lambda p: p.write_bytes(b"")}), says=[CIFAR])
data_case("cifar-junk", _folder("c2", {CIFAR: lambda p: p.write_bytes(b"\x80\x02junk" * 50)}), says=[CIFAR])
data_case("cifar-nested-labels", _folder("c3", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(labels=[[[0] * 100] * 100] * 2))}), says=[CIFAR])
data_case("cifar-float-label", _folder("c4", {CIFAR: lambda p: p.write_bytes(F.cifar_batch(labels=[0, 1.5]))}),
          says=[CIFAR])
data_case("cifar-label-2**40", _folder("c5", {CIFAR: lambda p: p.write_bytes(F.cifar_batch(labels=[0, 2**40]))}),
          says=[CIFAR, "1099511627776"])
data_case("cifar-label-neg", _folder("c6", {CIFAR: lambda p: p.write_bytes(F.cifar_batch(labels=[0, -3]))}),
          says=[CIFAR])
data_case("cifar-label-count", _folder("c7", {CIFAR: lambda p: p.write_bytes(F.cifar_batch(labels=[0, 1, 2]))}),
          says=[CIFAR])
data_case("cifar-data-int64", _folder("c8", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(data=np.zeros((2, 3072), np.int64)))}), says=[CIFAR])
data_case("cifar-data-shape", _folder("c9", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(data=np.zeros((2, 100), np.uint8)))}), says=[CIFAR])
data_case("cifar-os-system", _folder("c10", {CIFAR: lambda p: p.write_bytes(__import__("pickle").dumps(
    {b"data": F.Payload(), b"labels": [0, 1]}, protocol=2))}), says=[CIFAR])
data_case("cifar-huge-binbytes", _folder("c11", {CIFAR: lambda p: p.write_bytes(
    b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"\0" * 64)}), says=[CIFAR])
data_case("cifar-protocol5", _folder("c12", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(labels=[0, 2**40], protocol=5))}), says=[CIFAR])
data_case("cifar-train-classifier-label", _folder("c13", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(labels=[0, 100000]))}), says=[CIFAR], command="train-classifier")
data_case("npz-train-classifier-label", _npz("cls.npz", images=IM, labels=np.array([0, 1, 2**40, 3])),
          says=["cls.npz"], command="train-classifier")
data_case("long-caption.npz", _npz("long-caption.npz", images=IM, labels=np.array([0, 1, 1, 0]),
                                   class_names=np.array(["a b c d e f g h", "x"])), says=["8 words", "--max-prompt-len"])
data_case("npz-subprocess.npz", _npz("npz-subprocess.npz", images=IM, labels=np.array([0, 1, 2**40, 3])),
          says=["npz-subprocess.npz"], subprocess=True)


# ============================================================================ checkpoints


def ckpt_case(id, meta=None, arrays=None, argv=("sample",), code=2, says=("latest.npz",), **kw):
    """The session's class run with its latest.npz rewritten (meta(m) / arrays(flat) edit it), then argv."""
    def build(work, fx):
        fx.copy("run", work)
        path = work / "run" / "checkpoints" / "latest.npz"
        if callable(meta) or callable(arrays):
            F.rewrite_checkpoint(path, meta, arrays)
        elif isinstance(meta, bytes):
            path.write_bytes(meta)
        cmd = argv[0]
        if cmd == "sample":
            return ["sample", "--checkpoint", "run", *SAMPLE, *argv[1:]]
        if cmd == "train":
            return ["train", *TRAIN, "--conditioning", "class", "--resume", "--steps", "3", *argv[1:]]
        if cmd == "eval":
            return ["eval", "--checkpoint", "run", "--out", "o", "--n-per-class", "1", "--steps", "2", "--threads",
                    "1", *argv[1:]]
        return ["export", "--checkpoint", "run", "--out", "p", *argv[1:]]
    add(f"{argv[0]}-ckpt-{id}", argv[0], build, code, says, **kw)


def _drop(*keys):
    def edit(m):
        node = m
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


def _set(value, *keys):
    def edit(m):
        node = m
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def _arr(key, fn):
    def edit(flat):
        flat[key] = fn(flat[key])
    return edit


W = "params/conv_in.weight"
E = "ema/conv_in.weight"
for cmd in ("sample", "train", "eval", "export"):
    ckpt_case("empty", meta=b"", argv=(cmd,))
    ckpt_case("junk", meta=b"PK\3\4" + b"\0" * 100, argv=(cmd,))
for cmd in ("sample", "train"):
    add(f"{cmd}-ckpt-truncated", cmd, lambda w, fx, c=cmd: (
        fx.copy("run", w), F.truncate(w / "run" / "checkpoints" / "latest.npz", 0.6),
        ["sample", "--checkpoint", "run", *SAMPLE] if c == "sample" else
        ["train", *TRAIN, "--conditioning", "class", "--resume", "--steps", "3"])[-1], says=["latest.npz"])
add("sample-ckpt-no-meta", "sample", lambda w, fx: (
    fx.copy("run", w), np.savez(w / "run" / "checkpoints" / "latest.npz", x=np.zeros(3)),
    ["sample", "--checkpoint", "run", *SAMPLE])[-1], says=["latest.npz"])
add("sample-ckpt-meta-not-json", "sample", lambda w, fx: (
    fx.copy("run", w), np.savez(w / "run" / "checkpoints" / "latest.npz", __meta__=np.array("{not json")),
    ["sample", "--checkpoint", "run", *SAMPLE])[-1], says=["latest.npz"])
ckpt_case("meta-list", meta=lambda m: [1, 2])
ckpt_case("format-99", meta=_set(99, "checkpoint_format"))
ckpt_case("no-prediction-type", meta=_drop("train_config", "prediction_type"))
ckpt_case("no-conditioning", meta=_drop("conditioning"))
ckpt_case("no-model-config", meta=_drop("model_config"))
ckpt_case("no-num-train-timesteps", meta=_drop("train_config", "num_train_timesteps"))
ckpt_case("model-config-not-dict", meta=_set("tiny", "model_config"))
ckpt_case("layers-per-block-1e9", meta=_set(10**9, "model_config", "layers_per_block"))
ckpt_case("block-channels-negative", meta=_set([-8, 16], "model_config", "block_out_channels"))
ckpt_case("num-classes-2**40", meta=_set(2**40, "num_classes"))
ckpt_case("class-names-not-list", meta=_set(7, "class_names"))
ckpt_case("tokenizer-malformed", meta=_set({"vocab": 5}, "tokenizer"))
ckpt_case("conditioning-bogus", meta=_set("telepathy", "conditioning"))
ckpt_case("T-huge", meta=_set(10**12, "train_config", "num_train_timesteps"))
ckpt_case("nan-weights", arrays=_arr(W, lambda a: a * np.nan), says=("latest.npz", "conv_in.weight"))
ckpt_case("nan-ema", arrays=_arr(E, lambda a: a * np.nan), says=("latest.npz", "conv_in.weight"))
ckpt_case("inf-weights", arrays=_arr(W, lambda a: a + np.inf), says=("latest.npz", "conv_in.weight"))
ckpt_case("wrong-shape", arrays=_arr(E, lambda a: a[:1]), says=("latest.npz", "conv_in.weight"))
ckpt_case("missing-weight", arrays=lambda flat: {k: v for k, v in flat.items() if k not in (W, E)},
          says=("latest.npz", "conv_in.weight"))
ckpt_case("int-weights", arrays=_arr(E, lambda a: a.astype(np.int64)), says=("latest.npz", "conv_in.weight"))
ckpt_case("object-member", arrays=lambda flat: dict(flat, evil=F.object_array()))
ckpt_case("nan-weights", argv=("eval",), arrays=_arr(W, lambda a: a * np.nan), says=("latest.npz",))
ckpt_case("nan-weights", argv=("export",), arrays=_arr(W, lambda a: a * np.nan), says=("latest.npz",))
ckpt_case("no-rng", argv=("train",), meta=_drop("rng"))
ckpt_case("rng-garbage", argv=("train",), meta=_set({"bit_generator": "PCG64", "state": 5}, "rng"))
ckpt_case("no-step", argv=("train",), meta=_drop("step"))
ckpt_case("step-negative", argv=("train",), meta=_set(-5, "step"))
ckpt_case("no-opt-state", argv=("train",), arrays=lambda flat: {k: v for k, v in flat.items()
                                                               if not k.startswith("opt/")})
ckpt_case("nan-weights", argv=("train",), arrays=_arr(W, lambda a: a * np.nan))
add("sample-ckpt-huge-member", "sample", lambda w, fx: (
    fx.copy("run", w), F.npz_declaring(w / "run" / "checkpoints" / "latest.npz", "params/conv_in.weight",
                                       (2**20, 2**20), "<f4", extra={"__meta__": np.array("{}")}),
    ["sample", "--checkpoint", "run", *SAMPLE])[-1], says=["latest.npz"])
add("train-ckpt-huge-member", "train", lambda w, fx: (
    fx.copy("run", w), F.npz_declaring(w / "run" / "checkpoints" / "latest.npz", "ema/conv_in.weight",
                                       (2**20, 2**20), "<f4", extra={"__meta__": np.array("{}")}),
    ["train", *TRAIN, "--conditioning", "class", "--resume", "--steps", "3"])[-1], says=["latest.npz"])
add("sample-classifier-truncated", "sample", lambda w, fx: (
    fx.copy("classifier", w), F.truncate(w / "classifier" / "checkpoints" / "latest.npz", 0.5),
    [*_sample(w, fx), "--classifier", "classifier"])[-1], says=["latest.npz"])
add("sample-ckpt-nan-subprocess", "sample", lambda w, fx: (
    fx.copy("run", w), F.rewrite_checkpoint(w / "run" / "checkpoints" / "latest.npz",
                                            arrays=_arr(W, lambda a: a * np.nan)),
    ["sample", "--checkpoint", "run", *SAMPLE])[-1], says=["latest.npz"], subprocess=True)


# ============================================================================ load_pretrained and diffusers folders

UNET = "unet"  # the exported pipeline's UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors)
ST = "diffusion_pytorch_model.safetensors"


def pretrained_case(id, edit, says=(), via="call", code=2):
    """The session's exported pipeline, edit(folder) applied to its unet/; then load_pretrained(unet) (via
    'call') or minidiff sample --checkpoint pipeline (via 'sample')."""
    def build(work, fx):
        fx.copy("pipeline", work)
        edit(work / "pipeline" / UNET)
        if via == "sample":
            return ["sample", "--checkpoint", "pipeline", *SAMPLE]
        return {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(work / "pipeline" / UNET)]}
    add(f"{'load_pretrained' if via == 'call' else 'sample-pipeline'}-{id}",
        "load_pretrained" if via == "call" else "sample", build, code, says)


def _write(name, data):
    def edit(folder):
        (folder / name).write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return edit


def _config(**changes):
    def edit(folder):
        d = json.loads((folder / "config.json").read_text())
        d.update(changes)
        (folder / "config.json").write_text(json.dumps(d))
    return edit


for via in ("call", "sample"):
    pretrained_case("st-header-2**63", _write(ST, F.safetensors_bytes({}, length=2**63)), [ST], via)
    pretrained_case("st-header-2**40", _write(ST, F.safetensors_bytes({}, length=2**40)), [ST], via)
    pretrained_case("st-header-not-json", _write(ST, F.safetensors_bytes(b"{nope" + b" " * 27)), [ST], via)
    pretrained_case("st-offsets-past-end", _write(ST, F.safetensors_bytes(
        {"conv_in.weight": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}, b"\0" * 64)), [ST], via)
    pretrained_case("st-empty", _write(ST, b""), [ST], via)
    pretrained_case("st-truncated", lambda f: F.truncate(f / ST, 0.5), [ST], via)
    pretrained_case("config-not-object", _write("config.json", [1, 2, 3]), ["config.json"], via)
    pretrained_case("config-not-json", _write("config.json", b"{'sample_size': 16"), ["config.json"], via)
    pretrained_case("layers-per-block-1e9", _config(layers_per_block=10**9), ["config.json", "layers_per_block"], via)
    pretrained_case("sample-size-1e9", _config(sample_size=10**9), ["config.json", "sample_size"], via)
    pretrained_case("channels-negative", _config(block_out_channels=[-8, 16]), ["config.json"], via)
    pretrained_case("channels-huge", _config(block_out_channels=[2**20, 2**21]), ["config.json"], via)
pretrained_case("weights-missing", lambda f: (f / ST).unlink(), [ST])
pretrained_case("weights-pickle-bin", lambda f: ((f / ST).unlink(), (f / "diffusion_pytorch_model.bin").write_bytes(
    __import__("pickle").dumps(F.Payload())))[0], ["diffusion_pytorch_model.bin"])
pretrained_case("config-missing", lambda f: (f / "config.json").unlink(), ["config.json"])
pretrained_case("st-wrong-dtype-header", _write(ST, F.safetensors_bytes(
    {"conv_in.weight": {"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)), [ST])
add("load_pretrained-npz-no-config", "load_pretrained", lambda w, fx: (
    np.savez(w / "m.npz", x=np.zeros(3)),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.npz")]})[1], says=["m.npz"])
add("load_pretrained-npz-config-not-json", "load_pretrained", lambda w, fx: (
    np.savez(w / "m.npz", __config__=np.array("{bad")),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.npz")]})[1], says=["m.npz"])
add("load_pretrained-npz-object-payload", "load_pretrained", lambda w, fx: (
    np.savez(w / "m.npz", __config__=F.object_array()),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.npz")]})[1], says=["m.npz"])
add("load_pretrained-npz-empty", "load_pretrained", lambda w, fx: (
    (w / "m.npz").write_bytes(b""),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.npz")]})[1], says=["m.npz"])
add("load_pretrained-missing", "load_pretrained", lambda w, fx: {
    "call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "nowhere")]}, says=["nowhere"])
add("load_pretrained-st-file-header-2**63", "load_pretrained", lambda w, fx: (
    (w / "m.safetensors").write_bytes(F.safetensors_bytes({}, length=2**63)),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.safetensors")]})[1],
    says=["m.safetensors"])
add("load_pretrained-st-file-empty", "load_pretrained", lambda w, fx: (
    (w / "m.safetensors").write_bytes(b""),
    {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "m.safetensors")]})[1],
    says=["m.safetensors"])

# ============================================================================ loaders called directly


def loader_case(id, make, says=None):
    """load_dataset(path) on what make(work) wrote (the library's own error path)."""
    add(f"load_dataset-{id}", "data", lambda w, fx: {"call": "minidiff.data.loaders:load_dataset",
                                                     "args": [str(w / make(w))]}, 2, says or [id])


loader_case("bomb.png", _folder("d", {"a.png": ok, "bomb.png": lambda p: F.png_header(p, 50000, 50000)}), ["bomb.png"])
loader_case("label.npz", _npz("label.npz", images=IM, labels=np.array([0, 1, 2**40, 3])), ["label.npz"])
loader_case("idx-gz-bomb", _bytes(IDX_IMG + ".gz", F.gzip_bomb(F.idx([2, 8, 8], b"\0" * 128))), [IDX_IMG])
loader_case("cifar-nested", _folder("c", {CIFAR: lambda p: p.write_bytes(
    F.cifar_batch(labels=[[[0] * 1000] * 1000] * 2))}), [CIFAR])


# ============================================================================ diverged or non-finite (exit 1)

add("train-diverges-lr-1e6", "train", lambda w, fx: ["train", *TRAIN, "--lr", "1e6", "--save-every", "1", "--steps",
                                                      "6", "--grad-clip", "0", "--warmup-steps", "0", "--reference"],
    code=1, says=["--lr"], progress_ok=True, writes=("run",))
ckpt_case("overflowing-weights", arrays=lambda flat: {k: (v * np.float32(1e30) if k.startswith(("params/", "ema/"))
                                                         and v.ndim > 1 else v) for k, v in flat.items()},
          code=1, says=("non-finite",), progress_ok=True)

# ============================================================================ a folder where a file is expected

add("train-data-npz-is-a-folder", "train", lambda w, fx: ((w / "d.npz").mkdir(), ["train", *TRAIN, "--data", "d.npz"])[1],
    code=(2, 3), says=["d.npz"])
add("sample-checkpoint-npz-is-a-folder", "sample",
    lambda w, fx: ((w / "c.npz").mkdir(), ["sample", "--checkpoint", "c.npz", *SAMPLE])[1], code=(2, 3), says=["c.npz"])
add("export-out-is-a-file", "export",
    lambda w, fx: (_file(w), ["export", "--checkpoint", fx.copy("run", w), "--out", "file"])[1], code=(2, 3),
    says=["file"])
add("train-classifier-out-is-a-file", "train-classifier",
    lambda w, fx: (_file(w), ["train-classifier", "--out", "file", "--preset", "tiny", "--steps", "1",
                              "--batch-size", "2"])[1], code=(2, 3), says=["file"])
add("eval-out-is-a-file", "eval", lambda w, fx: (_file(w), ["eval", "--checkpoint", fx.copy("run", w), "--out", "file",
                                                            "--n-per-class", "1", "--steps", "2", "--threads", "1"])[1],
    code=(2, 3), says=["file"])
add("load_pretrained-folder-is-a-file", "load_pretrained", lambda w, fx: (
    _file(w, "unet"), {"call": "minidiff.model.pretrained:load_pretrained", "args": [str(w / "unet")]})[1],
    says=["unet"])

# ============================================================================ eval --nll on hostile data (nll.py reads it)

for _id, _make, _says in (("label-2**40.npz", _npz("l.npz", images=F.images(4, 16), labels=np.array([0, 1, 2**40, 3])),
                           ["l.npz"]),
                          ("bomb-folder", _folder("b", {"a.png": lambda p: F.png(p, 16),
                                                        "bomb.png": lambda p: F.png_header(p, 50000, 50000)}),
                           ["bomb.png"]),
                          ("idx-gz-bomb", _bytes(IDX_IMG + ".gz", F.gzip_bomb(F.idx([2, 16, 16], b"\0" * 512))),
                           [IDX_IMG]),
                          ("wrong-size.npz", _npz("s.npz", images=F.images(4, 8)), ["s.npz"])):
    add(f"eval-nll-data-{_id}", "eval", lambda w, fx, m=_make: ["eval", "--checkpoint", fx.copy("run", w), "--nll",
                                                                "--data", m(w), "--out", "o", "--n", "2",
                                                                "--threads", "1"], says=_says)

# ============================================================================ FIFOs (reading one would block) and oversized images


def _fifo(work: Path, rel: str) -> str:
    (work / rel).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(work / rel)
    return rel.split("/")[0]


add("sample-noise-fifo", "sample", lambda w, fx: (_fifo(w, "n.npy"), [*_sample(w, fx), "--noise", "n.npy"])[1],
    says=["n.npy"], timeout=30)
data_case("cifar-fifo", lambda w: _fifo(w, "cf/" + CIFAR), says=["cf"], timeout=30)
data_case("idx-fifo", lambda w: _fifo(w, "mf/" + IDX_IMG), says=["mf"], timeout=30)
data_case("side-600.npz", _npz("side-600.npz", images=np.zeros((2, 600, 600), np.uint8)),
          says=["side-600.npz", "--resolution"])
data_case("side-600:png", _folder("big600", {"a.png": lambda p: F.png(p, 600), "b.png": lambda p: F.png(p, 600)}),
          says=["big600", "--resolution"])

# ============================================================================ eval on other labelled data (eval_labelled.py)


def _npz_run(work: Path, fx, data: bool = True) -> list:
    fx.copy("npz_run", work)
    if data:
        fx.copy("labelled.npz", work)
    return ["eval", "--checkpoint", "npz_run", "--out", "o", "--n-per-class", "1", "--steps", "2", "--threads", "1"]


add("eval-labelled-data-gone", "eval", lambda w, fx: _npz_run(w, fx, data=False), says=["labelled.npz"])
add("eval-labelled-data-hostile", "eval", lambda w, fx: (
    _npz_run(w, fx, data=False), np.savez(w / "labelled.npz", images=F.images(4, 16), labels=np.array([0, 1, 2**40, 1])),
)[0], says=["labelled.npz"])
add("eval-labelled-eval-classifier-is-a-file", "eval", lambda w, fx: (
    _npz_run(w, fx), _file(w, "clf"))[0] + ["--eval-classifier", "clf"], code=(2, 3), says=["clf"])
add("eval-labelled-eval-classifier-foreign-folder", "eval", lambda w, fx: (
    _npz_run(w, fx), (w / "clf").mkdir(), _file(w / "clf", "mine.txt"))[0] + ["--eval-classifier", "clf"],
    says=["clf"])
add("eval-labelled-eval-classifier-truncated", "eval", lambda w, fx: (
    _npz_run(w, fx), (w / "clf" / "checkpoints").mkdir(parents=True),
    (w / "clf" / "checkpoints" / "latest.npz").write_bytes(b"PK\3\4" + b"\0" * 64))[0] + ["--eval-classifier", "clf"],
    says=["latest.npz"])
add("eval-labelled-eval-classifier-other-run", "eval", lambda w, fx: (
    _npz_run(w, fx), fx.copy("run", w))[0] + ["--eval-classifier", "run"], says=["run"])


def _damaged_eval_classifier(work: Path, fx, change) -> list:
    """npz_run's eval with --eval-classifier clf: a 2-step tiny eval classifier of labelled.npz, then change(arrays,
    meta) saved over it (a damaged or hand-edited cache)."""
    from minidiff.data import load_dataset
    from minidiff.training.checkpoint import load_checkpoint, save_checkpoint
    from minidiff.training.eval_classifier import EvalClassifierConfig, get_eval_classifier

    argv = _npz_run(work, fx)
    get_eval_classifier(load_dataset(str(work / "labelled.npz")), work / "clf", EvalClassifierConfig("tiny", 2),
                        log=lambda s: None)
    ckpt = work / "clf" / "checkpoints" / "latest.npz"
    arrays, meta = load_checkpoint(ckpt)
    change(arrays, meta)
    save_checkpoint(ckpt, arrays, meta)
    return argv + ["--eval-classifier", "clf"]


for _id, _change, _field in (("no-model_config", lambda a, m: m.pop("model_config"), "model_config"),
                             ("class_names-null", lambda a, m: m.update(class_names=None), "class_names"),
                             ("heldout_accuracy-str", lambda a, m: m.update(heldout_accuracy="x"), "heldout_accuracy"),
                             ("no-heldout-sigma", lambda a, m: a["heldout"].pop("sigma"), "heldout/")):
    add(f"eval-labelled-eval-classifier-{_id}", "eval", lambda w, fx, c=_change: _damaged_eval_classifier(w, fx, c),
        says=["latest.npz", _field])

# ============================================================================ CIFAR batches.meta (the class names)

for _id, _names in (("shared-1MiB-names", [b"a" * (1 << 20)] * 64), ("nested-names", [[b"cat"] * 100] * 100),
                    ("20000-names", [b"n%d" % i for i in range(20000)])):
    data_case(f"cifar-meta-{_id}", _folder(f"meta-{_id}", {CIFAR: lambda p: p.write_bytes(F.cifar_batch()),
                                                           "batches.meta": lambda p, n=_names: p.write_bytes(
                                                               __import__("pickle").dumps({b"label_names": n},
                                                                                          protocol=2))}),
              says=["batches.meta"])

# ============================================================================ the remaining float flags' infinities

for _name, _value in (("snr-gamma", "inf"), ("vlb-weight", "inf"), ("dropout", "-2"), ("weight-decay", "inf"),
                      ("p-uncond", "inf"), ("ema-decay", "inf")):
    flag(f"train--{_name}={_value}", ["train", f"--{_name}", _value, "--out", "run"], says=[f"--{_name}"])
for _name, _value in (("beta-end", "nan"), ("beta-start", "inf"), ("beta-start", "0.5")):
    add(f"sample--{_name}={_value}", "sample", lambda w, fx, n=_name, v=_value: [*_sample(w, fx), f"--{n}", v],
        says=[f"--{_name}"])
for _name, _value in (("lr", "inf"), ("weight-decay", "inf"), ("grad-clip", "inf")):
    flag(f"train-classifier--{_name}={_value}", ["train-classifier", f"--{_name}", _value, "--out", "run"],
         says=[f"--{_name}"])
flag("train--seed=-1", ["train", "--seed", "-1", "--out", "run", "--steps", "1", "--preset", "tiny", "--batch-size", "2",
                        "--threads", "1", "--sample-every", "0"], says=["seed"])
add("sample--seed=-1", "sample", lambda w, fx: [*_sample(w, fx), "--seed", "-1"], says=["seed"])
add("eval--seed=-1", "eval", lambda w, fx: ["eval", "--checkpoint", fx.copy("run", w), "--out", "o", "--seed", "-1",
                                            "--n-per-class", "1", "--steps", "2", "--threads", "1"], says=["seed"])
flag("train-classifier--seed=-1", ["train-classifier", "--seed", "-1", "--out", "run", "--steps", "1", "--preset",
                                   "tiny", "--batch-size", "2"], says=["seed"])


# ============================================================================ a full disk (RLIMIT_FSIZE: EFBIG past n bytes)


def no_temp_files(work: Path) -> None:
    """Nothing half-written is left: no *.tmp-* file, and every checkpoint there loads."""
    left = [str(p.relative_to(work)) for p in work.rglob("*") if ".tmp" in p.name]
    assert not left, f"temp files left behind: {left}"
    for p in work.rglob("latest.npz"):
        F.read_npz(p)


add("train-disk-full-at-the-checkpoint", "train", lambda w, fx: ["train", *TRAIN], code=3, says=["latest.npz"],
    fsize=200_000, writes=("run",), after=no_temp_files, progress_ok=True)
add("train-classifier-disk-full", "train-classifier",
    lambda w, fx: ["train-classifier", "--out", "clf_run", "--preset", "tiny", "--steps", "1", "--batch-size", "2"],
    code=3, says=["clf_run"], fsize=20_000, writes=("clf_run",), after=no_temp_files, progress_ok=True)
add("sample-disk-full", "sample", lambda w, fx: [*_sample(w, fx)], code=3, says=["samples/"], fsize=2_000,
    writes=("samples",), after=no_temp_files, progress_ok=True)
add("export-disk-full", "export", lambda w, fx: ["export", "--checkpoint", fx.copy("run", w), "--out", "pipe_out"],
    code=3, says=["pipe_out"], fsize=20_000, writes=("pipe_out",), after=no_temp_files)
add("fixtures-disk-full", "fixtures", lambda w, fx: ["fixtures", "--out", "fx_out", "--only", "schedules"], code=3,
    says=["fx_out/schedules.npz"], fsize=2_000, writes=("fx_out",), after=no_temp_files)
add("eval-disk-full", "eval", lambda w, fx: ["eval", "--checkpoint", fx.copy("run", w), "--out", "eval_out",
                                             "--n-per-class", "1", "--steps", "2", "--threads", "1"], code=3,
    says=["eval_out/"], fsize=200, writes=("eval_out",), after=no_temp_files, progress_ok=True)

# ============================================================================ errors quote inputs, never megabytes of them

add("sample-prompt-200000-words", "sample", lambda w, fx: [
    "sample", "--checkpoint", fx.copy("text_run", w), *SAMPLE, "--prompt", "red " * 200_000], says=["words"])
add("sample-prompt-huge-unknown-word", "sample", lambda w, fx: [
    "sample", "--checkpoint", fx.copy("text_run", w), *SAMPLE, "--prompt", "x" * 1_000_000], says=["unknown word"])
data_case("3000-empty-class-folders", _folder("many", {"a/x.png": ok, **{f"c{i:04d}/.keep": (lambda p: p.write_text(""))
                                                                          for i in range(3000)}}), says=["3000 class"])
data_case("5000-members.npz", _npz("5000-members.npz", **{f"m{i}": np.zeros(1) for i in range(5000)}),
          says=["5000-members.npz", "5000 in all"])

# ============================================================================ JSON nested past the recursion limit

DEEP = b"[" * 100_000 + b"]" * 100_000
pretrained_case("config-nested-100000-deep", _write("config.json", DEEP), ["config.json"])
pretrained_case("config-nested-100000-deep", _write("config.json", DEEP), ["config.json"], via="sample")
add("sample-ckpt-meta-nested-100000-deep", "sample", lambda w, fx: (
    fx.copy("run", w), np.savez(w / "run" / "checkpoints" / "latest.npz", __meta__=np.array(DEEP.decode())),
    ["sample", "--checkpoint", "run", *SAMPLE])[-1], says=["latest.npz"])
add("train-ckpt-meta-nested-100000-deep", "train", lambda w, fx: (
    fx.copy("run", w), np.savez(w / "run" / "checkpoints" / "latest.npz", __meta__=np.array(DEEP.decode())),
    ["train", *TRAIN, "--conditioning", "class", "--resume", "--steps", "3"])[-1], says=["latest.npz"])

# ============================================================================ names longer than the file system takes (ENAMETOOLONG)

LONG = "n" * 300  # NAME_MAX is 255 on Linux file systems
add("train-out-name-too-long", "train", lambda w, fx: ["train", *TRAIN[2:], "--out", LONG], code=(2, 3),
    says=["too long"])
add("train-data-name-too-long", "train", lambda w, fx: ["train", *TRAIN, "--data", LONG], code=(2, 3), says=[LONG[:50]])
add("sample-out-name-too-long", "sample", lambda w, fx: [*_sample(w, fx)[:-1], LONG], code=(2, 3), says=["too long"])
add("sample-checkpoint-name-too-long", "sample", lambda w, fx: ["sample", "--checkpoint", LONG, *SAMPLE], code=(2, 3),
    says=[LONG[:50]])
add("fixtures-out-name-too-long", "fixtures", lambda w, fx: ["fixtures", "--out", LONG, "--only", "schedules"],
    code=(2, 3), says=["too long"])
add("export-out-name-too-long", "export", lambda w, fx: ["export", "--checkpoint", fx.copy("run", w), "--out", LONG],
    code=(2, 3), says=["too long"])

# ============================================================================ .npz images of every odd dtype

for _dt, _images in (("complex", IM.astype(np.complex64)), ("bool", IM > 100), ("float16-inf", np.full((4, 8, 8), np.inf,
                  np.float16)), ("datetime", IM.astype("datetime64[s]")), ("structured", np.zeros((4, 8, 8),
                  [("r", "u1"), ("g", "u1")])), ("strings", np.full((4, 8, 8), "x")), ("uint16", IM.astype(np.uint16)),
                  ("0-d", np.array(5)), ("labels-0-d", None)):
    _arrays = {"images": _images} if _images is not None else {"images": IM, "labels": np.array(3)}
    data_case(f"dtype-{_dt}.npz", _npz(f"dtype-{_dt}.npz", **_arrays), says=[f"dtype-{_dt}.npz"])

# ============================================================================ EPERM even as root: an --out under /sys (Linux)

if os.path.isdir("/sys/kernel"):  # sysfs refuses new folders to every user, root included
    SYS = "/sys/minidiff-bad-input"
    add("train-out-under-sys", "train", lambda w, fx: ["train", *TRAIN[2:], "--out", SYS], code=3, says=[SYS])
    add("sample-out-under-sys", "sample", lambda w, fx: [*_sample(w, fx)[:-1], SYS], code=3, says=[SYS])
    add("eval-out-under-sys", "eval", lambda w, fx: ["eval", "--checkpoint", fx.copy("run", w), "--out", SYS,
                                                     "--n-per-class", "1", "--steps", "2", "--threads", "1"],
        code=3, says=[SYS])
    add("export-out-under-sys", "export", lambda w, fx: ["export", "--checkpoint", fx.copy("run", w), "--out", SYS],
        code=3, says=[SYS])
    add("fixtures-out-under-sys", "fixtures", lambda w, fx: ["fixtures", "--out", SYS, "--only", "schedules"], code=3,
        says=[SYS])
    add("train-classifier-out-under-sys", "train-classifier", lambda w, fx: [
        "train-classifier", "--out", SYS, "--preset", "tiny", "--steps", "1", "--batch-size", "2"], code=3, says=[SYS])

# ============================================================================ oracle adapters that fail to import

for _id, _src in (("syntax-error", "def broken(:\n"), ("raises-at-import", "raise RuntimeError('boom')\n"),
                  ("imports-missing", "import no_such_module_xyz\n")):
    add(f"oracle-adapter-{_id}", "oracle", lambda w, fx, src=_src, i=_id: (
        (w / f"adapter_{i.replace('-', '_')}.py").write_text(src),
        ["oracle", "--adapter", f"adapter_{i.replace('-', '_')}:Adapter"])[1], says=["adapter_"])

# ============================================================================ bench's --json

BENCH = ["bench", "--no-torch", "--repeats", "1", "--warmup", "0", "--rounds", "1", "--batch", "1", "--preset", "tiny",
         "--no-memory", "--threads", "1"]
add("bench-json-under-a-file", "bench", lambda w, fx: (_file(w), [*BENCH, "--json", "file/b.json"])[1], code=3,
    says=["file/b.json"])
add("bench-json-is-a-folder", "bench", lambda w, fx: ((w / "b.json").mkdir(), [*BENCH, "--json", "b.json"])[1],
    code=(2, 3), says=["b.json"])
if os.path.isdir("/sys/kernel"):
    add("bench-json-under-sys", "bench", lambda w, fx: [*BENCH, "--json", "/sys/minidiff-bad-input.json"], code=3,
        says=["/sys/minidiff-bad-input.json"])
