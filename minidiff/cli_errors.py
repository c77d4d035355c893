"""One-line errors of the `minidiff` command: exit statuses, the error classifier, the one-line argparse parser.

Every expected failure ends as one line on stderr, "minidiff COMMAND: error: ...", and an exit status from
EXIT_CODES (shown by minidiff --help); an exception classify_error does not know is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
from pathlib import Path

from .backend import BackendError


EXIT_CODES = """exit status:
  0    done
  1    training diverged, or the model gave non-finite output (try a lower --lr or an earlier checkpoint)
  2    bad input: a flag, a missing or malformed file (image, .npz, checkpoint, JSON, safetensors)
  3    the system refused: disk full, permission denied, a path that is a file where a folder is needed
       (or the reverse), any other OS error; the message names the path
  4    out of memory (try a smaller --batch-size, --n or input)
  130  interrupted (Ctrl-C)
every error is one line on stderr: "minidiff COMMAND: error: ..." """

OS_HINTS = {  # errno -> what to do
    errno.ENOSPC: "the disk is full; free some space or pass another --out",
    errno.EDQUOT: "the disk quota is exhausted; free some space or pass another --out",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f) or the disk is full; pass another --out",
    errno.EACCES: "permission denied; pass a path you can write (or read) or change its permissions",
    errno.EPERM: "operation not permitted; pass another path or change its permissions",
    errno.EROFS: "the file system is read-only; pass another --out",
    errno.ENOTDIR: "a part of this path is a file, not a folder; pass another path",
    errno.EISDIR: "this is a folder where a file is needed; pass a file",
    errno.ENAMETOOLONG: "the name is too long; pass a shorter path",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) or use fewer --threads",
}


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the path(s), the system's words, what to do."""
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None) or "(path not known)"
    what = err.strerror or str(err) or type(err).__name__
    hint = OS_HINTS.get(err.errno, "check the path and try again")
    return f"{paths}: {what}; {hint}"


def classify_error(err: BaseException) -> tuple[int, str] | None:
    """(exit status, message) for an error the CLI reports in one line; None: a bug, keep the traceback."""
    name = type(err).__name__
    if isinstance(err, (FileNotFoundError, FileExistsError)) and err.strerror is None:
        return 2, str(err)  # minidiff's own messages
    if name == "DecompressionBombError" or name == "UnidentifiedImageError":  # PIL's (the latter an OSError)
        return 2, f"cannot read an image ({err}); remove or replace the file"
    if name == "SafetensorError" and "I/O error" in str(err):  # writing one failed: the disk, not the file
        return 3, f"writing or reading a .safetensors file failed ({err}); check the disk and the path (--out)"
    if name == "SafetensorError":  # safetensors' Rust errors
        return 2, f"malformed .safetensors file ({err}); replace the file"
    if isinstance(err, SyntaxError):  # minidiff's own code compiled at import: this is a user's file (an adapter)
        return 2, f"{err.filename}:{err.lineno}: {type(err).__name__}: {err.msg}; fix the file"
    if isinstance(err, (ValueError, BackendError)):  # json.JSONDecodeError included
        return 2, str(err)
    if isinstance(err, FileNotFoundError):
        return 2, os_error_line(err)
    if isinstance(err, OSError):
        return 3, os_error_line(err)
    if isinstance(err, MemoryError):
        return 4, f"out of memory ({err or 'an allocation failed'}); try a smaller --batch-size, --n or input"
    if isinstance(err, RuntimeError):  # TrainingDiverged and friends
        return 1, str(err)
    return None


# Every negative number literal float() reads, -inf, -nan and -1e400 included. argparse's own pattern knows only
# -5 and -.5, so `--scales 1 -inf` took -inf for an unknown option, and no line named --scales or what it allows.
NEGATIVE_NUMBER = re.compile(r"^-(\d|\.\d|inf(inity)?$|nan$)", re.IGNORECASE)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line on stderr ("minidiff train: error: argument --steps: ..."),
    exit status 2, like every other error (the usage is in --help). Subcommands inherit the class. A negative
    number (-inf, -1e400 too) is a flag's value, never an option, so the flag's own check names it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's pattern (a private attribute since 2.7)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")


def check_can_create(folder: Path) -> None:
    """OSError naming folder (ENOTDIR, EACCES, EPERM, EROFS) unless it is a folder, or could be made, where files can
    be created: a throwaway folder is made in its nearest existing ancestor and removed at once (mode bits alone do
    not tell for root, sysfs or a read-only mount). Leaves nothing behind: a failed command leaves no empty folder."""
    import tempfile

    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.exists():
        return
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe if probe == folder else folder))
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".minidiff-probe-", dir=probe))
    except OSError as err:
        raise type(err)(err.errno, err.strerror or str(err), str(folder)) from None
