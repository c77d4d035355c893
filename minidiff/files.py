"""Writing a file so that a kill or a power loss leaves the old file or the new one, never half of one.

    write_atomic(path, write)   write(f) fills <path>.tmp-<pid> (a binary file object in path's folder); the
                                temporary file is fsync'ed, os.replace'd onto path, and the folder fsync'ed
    fsync_dir(folder)           persist a rename (POSIX); a no-op where a folder cannot be opened

The one writer of checkpoints (training/checkpoint.py), run files (training/run_folder.py: config.json,
log.jsonl), weights (model/pretrained.py), and the command line's outputs (cli_errors.py: eval.json, grids,
nll.json; fixtures.py). It sits below every layer (it imports only the standard library), so model/ may use it.
The order matters: the bytes reach the disk before the name points at them (fsync, then os.replace, which is
atomic on POSIX and Windows), and the rename itself reaches the disk before the caller goes on (fsync of the
folder). A failed write removes the temporary file; its OSError names path, not the temporary name.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path, write) -> Path:
    """Write path through path.tmp-<pid>: write(f) with f the open binary temporary file (or write = the bytes),
    then fsync, os.replace onto path, fsync the folder. Returns path. A write, fsync or rename that fails (a full
    disk: ENOSPC, EFBIG) leaves path as it was and no temporary file; its OSError names path."""
    path = Path(path)
    if isinstance(write, (bytes, bytearray)):
        data = write
        write = lambda f: f.write(data)  # noqa: E731
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)  # atomic swap: old file or new file, never half of one
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename in (None, str(tmp)):  # ENOSPC in a write: name the file
            raise type(err)(err.errno, err.strerror or str(err), str(path)) from err
        raise
    fsync_dir(path.parent)  # the rename itself
    return path


def fsync_dir(folder) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
