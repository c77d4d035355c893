"""Issue 17: the table-driven bad-input suite. Nothing a file or a flag can do crashes minidiff.

Every case of tests/bad_inputs_cases.py (hostile files, bad flags, bad paths, bad checkpoints, bad
pretrained folders) runs `minidiff ...` (or a loader, for the library cases) under an address-space cap
(RLIMIT_AS = AS_BYTES) with a timeout, and must:
    exit with its documented status (minidiff --help: 1 diverged, 2 bad input, 3 OS error, 4 out of memory),
    print exactly one line on stderr (no "Traceback", no warning) holding the words of the case (a flag,
    the file's name),
    leave its folder -- the inputs and any run or output folder -- byte for byte as it was (a case that
    legitimately starts writing, a diverged training or a full disk, names the folders it may change and
    checks what is there instead: no temp file, every checkpoint loadable; a run folder's lock file may get
    the PID of its latest writer, nothing else).
Permission cases are skipped, with the reason, when the suite runs as root (mode bits do not stop root).
The cases run in children forked from one server process that imported minidiff.cli once
(tests/bad_inputs_server.py), five as real `python -m minidiff`. Measured on the 2-core CI box under load:
a forked case takes 0.14 s (median, inputs built and hashed included), a real subprocess 0.2-0.6 s; the ~370
cases with the session's fixtures (two tiny runs, a classifier, an export, a labelled .npz run) ~1 min.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bad_inputs_cases import CASES

ROOT = Path(__file__).resolve().parents[1]
AS_BYTES = 3 << 30  # the address-space cap of every case (numpy, OpenBLAS and a tiny U-Net fit well under it)
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
MAX_LINE = 2000  # an error line quotes its input (a prompt, a folder list) in part, never whole
PROGRESS = re.compile(r"^(step|sample|\s*$)|\[[#.]*\]")  # the progress bar's lines (training or sampling ran)


class Server:
    """tests/bad_inputs_server.py as a subprocess: one JSON request per case, one JSON answer."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "bad_inputs_server.py")], cwd=ROOT,
                                     env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ready = json.loads(self.proc.stdout.readline())

    def run(self, request: dict) -> dict:
        if self.proc.poll() is not None:  # it died (an earlier case's fault is reported there): start another
            self.__init__()
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"the bad-input fork server died on {request}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_subprocess(argv, cwd: Path, timeout: float) -> dict:
    """The same case as a real `python -m minidiff` under the same cap."""
    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (AS_BYTES, AS_BYTES))
    try:
        p = subprocess.run([sys.executable, "-m", "minidiff", *argv], cwd=cwd, env=ENV, capture_output=True,
                           text=True, timeout=timeout, preexec_fn=cap)
    except subprocess.TimeoutExpired as t:
        return {"rc": None, "stdout": "", "stderr": str(t.stderr or ""), "timed_out": True}
    return {"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "timed_out": False}


class Fixtures:
    """The session's trained runs (built once, by the server), copied into each case's folder on request."""

    def __init__(self, folder: Path):
        self.folder = folder

    def copy(self, name: str, work: Path) -> str:
        if (self.folder / name).is_file():
            shutil.copy2(self.folder / name, work / name)
        else:
            shutil.copytree(self.folder / name, work / name, symlinks=True)
        return name


BUILD = [  # (name, argv) run in the fixtures folder, each must exit 0
    ("run", ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--sample-every", "0", "--threads",
             "1", "--conditioning", "class", "--out", "run", "--reference"]),
    ("text_run", ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--sample-every", "0",
                  "--threads", "1", "--conditioning", "text", "--out", "text_run", "--reference"]),
    ("classifier", ["train-classifier", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--out",
                    "classifier"]),
    ("pipeline", ["export", "--checkpoint", "run", "--out", "pipeline"]),
    ("npz_run", ["train", "--preset", "tiny", "--steps", "2", "--batch-size", "2", "--sample-every", "0", "--threads",
                 "1", "--data", "labelled.npz", "--out", "npz_run", "--reference"]),  # eval_labelled.py's runs
]


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def fixtures(server, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad-inputs-fixtures")
    rng = np.random.default_rng(0)  # 8 labelled 16x16 gray images, 2 classes, for npz_run
    np.savez(folder / "labelled.npz", images=rng.integers(0, 256, (8, 16, 16), dtype=np.uint8),
             labels=np.arange(8) % 2)
    for name, argv in BUILD:
        ans = server.run({"argv": argv, "cwd": str(folder), "timeout": 300, "as_bytes": AS_BYTES})
        assert ans["rc"] == 0, f"building the fixture {name} failed: {ans['stderr'][-2000:]}"
    return Fixtures(folder)


def tree(folder: Path) -> dict:
    """{relative path: (kind, mode, sha256)} of everything under folder. The run-folder lock's content (the
    PID of its last writer) is left out; its presence is not."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777)
            elif name == ".minidiff-lock":
                out[rel] = ("lock", st.st_mode & 0o7777)
            elif not stat.S_ISREG(st.st_mode):  # a FIFO (reading it would block), a socket
                out[rel] = ("special", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def error_line(case, ans) -> str:
    """The one error line of an answer; asserts the case's exit status and stderr's shape."""
    err = ans["stderr"]
    where = f"rc={ans['rc']}\n--- stderr ---\n{err[-3000:]}\n--- stdout ---\n{ans['stdout'][-1000:]}"
    assert not ans["timed_out"], f"timed out after {case.timeout} s\n{where}"
    codes = case.code if isinstance(case.code, tuple) else (case.code,)
    assert ans["rc"] in codes, f"exit status {ans['rc']}, want {codes}\n{where}"
    assert "Traceback" not in err and "Warning" not in err, f"a traceback or warning on stderr\n{where}"
    lines = err.rstrip("\n").splitlines()
    if case.progress_ok and all(PROGRESS.search(ln) for ln in lines[:-1]):
        lines = lines[-1:]  # the progress bar ran (training or sampling), then the one error line
    assert len(lines) == 1, f"{len(lines)} lines on stderr, want exactly one\n{where}"
    assert len(lines[0]) <= MAX_LINE, f"an error line of {len(lines[0]):,} characters, at most {MAX_LINE:,}\n{where}"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_issue17_bad_input(case, server, fixtures, tmp_path):
    if case.needs_non_root and os.geteuid() == 0:
        pytest.skip(case.needs_non_root)
    work = tmp_path / "work"
    work.mkdir()
    request = case.build(work, fixtures)
    before = tree(work)
    try:
        if case.subprocess:
            ans = run_subprocess(request, work, case.timeout)
        else:
            request = request if isinstance(request, dict) else {"argv": request}
            ans = server.run(dict(request, cwd=str(work), timeout=case.timeout, as_bytes=AS_BYTES, fsize=case.fsize))
    finally:
        if case.needs_non_root:  # the unwritable cases: make them removable again
            for dirpath, _, _ in os.walk(work):
                os.chmod(dirpath, 0o755)
    line = error_line(case, ans)
    assert re.match(r"minidiff( [\w-]+)?: error: ", line), line
    for words in case.says:
        assert words in line, f"{words!r} not in the error line: {line}"
    after = tree(work)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and k.split(os.sep)[0] not in case.writes)
    assert not changed, f"the command changed {changed[:8]} (error: {line})"
    if case.after is not None:
        case.after(work)


def test_issue17_the_table_has_at_least_100_cases_over_every_command():
    by = {}
    for c in CASES:
        by[c.command] = by.get(c.command, 0) + 1
    assert len(CASES) >= 100 and len({c.id for c in CASES}) == len(CASES)
    for command in ("train", "sample", "eval", "train-classifier", "fixtures", "export", "bench", "oracle", "data",
                    "load_pretrained"):
        assert by.get(command), f"no case for {command}"


def test_issue17_the_server_forks_with_no_thread_and_numpy_works_under_the_cap(server, tmp_path):
    assert server.ready["threads"] == 1  # nothing but the main thread when it forks
    ans = run_subprocess(["info"], tmp_path, 60)
    assert ans["rc"] == 0 and "Traceback" not in ans["stderr"], ans
    code = "import numpy as np; a = np.ones((256, 256)); print(float((a @ a).sum()))"
    p = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (AS_BYTES, AS_BYTES)))
    assert p.returncode == 0 and p.stdout.strip() == str(256.0 ** 3), p.stderr


def test_issue17_warnings_are_held_back_and_shown_only_after_a_success(monkeypatch, capsys):
    """cli.main prints no warning before an error line; a command that succeeds shows each one once, after."""
    import warnings

    import numpy as np

    from minidiff import cli

    def warns_then_fails(args):
        np.exp(np.float32(1000))  # RuntimeWarning: overflow encountered in exp
        raise ValueError("a bad file")

    def warns_then_succeeds(args):
        for _ in range(3):
            warnings.warn("check your data", RuntimeWarning)
        return 0

    monkeypatch.setattr(cli, "cmd_export", warns_then_fails)
    assert cli.main(["export", "--checkpoint", "c", "--out", "o"]) == 2
    assert capsys.readouterr().err.splitlines() == ["minidiff export: error: a bad file"]
    monkeypatch.setattr(cli, "cmd_export", warns_then_succeeds)
    assert cli.main(["export", "--checkpoint", "c", "--out", "o"]) == 0
    assert capsys.readouterr().err.splitlines() == ["minidiff export: warning: RuntimeWarning: check your data"]
    with pytest.warns(RuntimeWarning):  # library use: warnings are untouched
        np.exp(np.float32(1000))


def test_issue17_the_cap_holds_in_the_forked_cases(server, tmp_path):
    """An 8 GiB allocation in a case fails (MemoryError: exit 4, one line) instead of filling the machine."""
    ans = server.run({"call": "numpy:ones", "args": [2**30], "cwd": str(tmp_path), "timeout": 60,
                      "as_bytes": AS_BYTES})
    assert ans["rc"] == 4 and ans["stderr"].startswith("minidiff library: error: out of memory"), ans
    ans = server.run({"call": "numpy:ones", "args": [2**20], "cwd": str(tmp_path), "timeout": 60,
                      "as_bytes": AS_BYTES})
    assert ans["rc"] == 0 and ans["stderr"] == "", ans
