"""A run folder on disk: its lock, its start (new, again, or resumed), its log, and the ops it records.

    RUN/config.json              the run's settings (Trainer.meta of its latest start or resume, ops record included)
    RUN/log.jsonl                one JSON line per logged step; trimmed back to the checkpoint's step on --resume
    RUN/loss.png, RUN/samples/   pictures
    RUN/checkpoints/latest.npz   checkpoint.py (and step_XXXXXX.npz with --checkpoints-total-limit)
    RUN/.minidiff-lock           one writer per folder (fcntl.flock), holding the writer's PID

A file is rewritten through a temporary name <name>.tmp-<pid>, fsync'ed, and os.replace (files.write_atomic), so a
kill or a power loss leaves the old file or the new one; the next start removes such temp files (one writer per
folder: they are a killed writer's). The ops record {"name": "reference" | "fast", "shards": N, "device": "cpu" |
"gpu"} names what decides a step's bits (a record without "device", from before it was recorded, is a CPU run's).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from ..files import write_atomic
from .checkpoint import META_KEY, STEP_FILE, check_member_sizes

LOCK_NAME = ".minidiff-lock"  # one writer per run folder: an fcntl.flock on this file, which holds its PID
RUN_FILES = {"config.json", "log.jsonl", "loss.png", "checkpoints", "samples", LOCK_NAME}  # what a run writes
TEMP = re.compile(r"^(config\.json|log\.jsonl|loss\.png)\.tmp-\d+$")  # a killed rewrite of a run file (write_atomic)


def has_checkpoint(out: Path) -> bool:
    """Whether the run folder holds a checkpoint (latest.npz or a kept step_XXXXXX.npz)."""
    ckpts = out / "checkpoints"
    return ckpts.is_dir() and any(p.name == "latest.npz" or STEP_FILE.match(p.name) for p in ckpts.iterdir())


def lock_run_dir(out: Path):
    """Take the run folder's advisory lock (fcntl.flock, LOCK_EX | LOCK_NB) and write our PID into it; the
    returned open file holds the lock until it is closed (or the process ends). A second writer gets a
    RuntimeError naming the holder's PID. Without fcntl (Windows) no lock is taken: None."""
    try:
        import fcntl
    except ImportError:
        return None
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / LOCK_NAME, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RuntimeError(f"--out {str(out)!r} is in use by another minidiff process (PID {holder}); wait for it "
                           "to finish or stop it, or choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def check_run_dir(cfg) -> Path:
    """The run folder cfg.out, unless --resume finds no checkpoint there or a new run would reuse a folder that
    holds an earlier run (a checkpoint) or other files; reads only (called before the lock is taken, and again
    under it by prepare_run_dir), so a refused command leaves nothing behind."""
    out = Path(cfg.out).expanduser()
    latest = out / "checkpoints" / "latest.npz"
    if cfg.resume:
        if not latest.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {latest}; start a new run without --resume")
    elif out.exists() and (has_checkpoint(out) or any(p.name not in RUN_FILES and not TEMP.match(p.name)
                                                      for p in out.iterdir())):
        raise FileExistsError(f"--out {str(out)!r} already holds a run; pass --resume to continue it or choose "
                              "a new --out (nothing was overwritten)")
    return out


def prepare_run_dir(cfg) -> Path:
    """Create the run directory; refuse to reuse one that holds an earlier run (a checkpoint) unless --resume.

    A folder with only a run's own files and no checkpoint (a run stopped or failed before its first
    save) is started again: its log and loss curve are removed. Stale temp files (latest.npz.tmp-<pid>
    from a killed save, log.jsonl.tmp-<pid> from a killed trim, loss.png.tmp-<pid> and samples/*.tmp-<pid> from
    a killed picture) are removed; call it with the lock held."""
    out = check_run_dir(cfg)
    if not cfg.resume and out.exists():  # a run that never saved: start it again
        for name in ("log.jsonl", "loss.png"):
            (out / name).unlink(missing_ok=True)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    stale = [*(out / "checkpoints").glob("*.tmp-*"), *(out / "samples").glob("*.tmp-*"),
             *(p for p in out.iterdir() if TEMP.match(p.name))]
    for tmp in stale:  # one writer per folder: any temp file is stale
        tmp.unlink(missing_ok=True)
    return out


def remove_unused_run_dir(out: Path) -> None:
    """Remove a run folder that a failed start made: its lock file and empty checkpoints/ and samples/, then the
    folder itself if that left it empty (anything else in it stays)."""
    (out / LOCK_NAME).unlink(missing_ok=True)
    for folder in (out / "checkpoints", out / "samples", out):
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass


def trim_log(log: Path, step: int) -> int:
    """Drop the lines of log.jsonl whose step is after `step` (the checkpoint's), and any line that is not a
    JSON object with an int step (the last one cut short by a kill), so that the log matches the weights and
    a resumed run continues it without repeating or going back; atomic (write_atomic). Returns the lines dropped."""
    if not log.exists():
        return 0
    *complete, last = log.read_bytes().split(b"\n")  # last: b"", or a line cut short by a kill
    steps = [_step_of(line) for line in complete]
    kept = [line for line, s in zip(complete, steps) if s is not None and s <= step]
    dropped = len(complete) - len(kept) + (last != b"")
    if dropped:
        write_atomic(log, b"".join(line + b"\n" for line in kept))
    return dropped


def _step_of(line: bytes) -> int | None:
    """The step of a log line, or None for a line that is not a JSON object with an int step."""
    try:
        rec = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = rec.get("step") if isinstance(rec, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def ops_record(ops, gpu: bool = False) -> dict:
    """{"name": ops.name ("reference" or "fast"), "shards": N, "device": "cpu" | "gpu"}: what decides the bits of a
    step. N is the number of CPU shards the fast table's map_batch splits a batch into (its owner's `workers`:
    fast/cpu/shards.py's Shards, read by duck typing as training/ never imports fast/); 1 for a table that runs the
    batch whole, and on a GPU (gpu=True), which runs it whole."""
    shards = 1 if gpu else getattr(getattr(ops.map_batch, "__self__", None), "workers", 1)
    return {"name": str(getattr(ops, "name", "custom")), "shards": int(shards), "device": "gpu" if gpu else "cpu"}


def recorded_ops(out) -> dict | None:
    """The ops record in RUN/checkpoints/latest.npz's metadata (read alone, its size checked first), or None when
    there is none or it cannot be read (the resume that follows says why)."""
    latest = Path(out).expanduser() / "checkpoints" / "latest.npz"
    try:
        check_member_sizes(latest)
        with np.load(latest, allow_pickle=False) as z:
            record = json.loads(str(z[META_KEY][()])).get("ops")
    except Exception:  # noqa: BLE001  (any failure: no record; load_checkpoint reports it in one line)
        return None
    return record if isinstance(record, dict) else None


def recorded_shards(out) -> int:
    """--threads for a resume left at 0 (auto): the recorded shard count of a fast CPU run, else 0 (auto)."""
    record = {"device": "cpu", **(recorded_ops(out) or {})}  # a record without a device is a CPU run's
    shards = record.get("shards")
    fast_cpu = record.get("name") == "fast" and record["device"] == "cpu"  # a GPU's count was no choice
    return shards if fast_cpu and isinstance(shards, int) and 1 <= shards <= 1024 else 0


def ops_notice(recorded: dict | None, current: dict) -> str | None:
    """One line when a resume runs other ops than the checkpoint recorded (None: the same, or none recorded): other
    ops, another CPU shard count, or another device (a record without a device is a CPU run's). Its advice fits the
    device: --threads splits a batch over CPU cores and does nothing on a GPU."""
    if not recorded:
        return None
    recorded, current = {"device": "cpu", **recorded}, {"device": "cpu", **current}
    if recorded == current:
        return None
    moved = recorded["device"] != current["device"]
    if moved:  # the same device first; then the same ops on it
        keep = f"resume with --device {recorded['device']}"
        if recorded["device"] == "cpu" and recorded["name"] == "fast":
            keep += f" --threads {recorded['shards']}"
            if current["device"] == "gpu" and recorded["shards"] > 1:  # only the CPU can split the batch again
                keep = f"--threads does nothing on a GPU, which runs the batch whole: {keep}"
        if recorded["name"] != current["name"]:
            keep += " --reference" if recorded["name"] == "reference" else " and without --reference"
    elif recorded["name"] == "reference":
        keep = "pass --reference"
    else:
        keep = f"pass --threads {recorded['shards']}" if current["name"] == "fast" else "drop --reference"
    return (f"note: the checkpoint was trained with {_describe(recorded, moved)} and this resume runs "
            f"{_describe(current, moved)}: the continuation will not be bit-exact with the recorded setting ({keep} "
            "to keep it)")


def _describe(record: dict, moved: bool) -> str:
    """'the fast ops in 2 CPU shard(s)', 'the reference ops', '... on the GPU'; '... on the CPU' when moved."""
    if record["device"] == "gpu":
        where = "on the GPU"
    else:
        where = f"in {record['shards']} CPU shard(s)" if record["name"] != "reference" else "on the CPU" if moved else ""
    return f"the {record['name']} ops {where}".rstrip()
