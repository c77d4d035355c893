"""Fork server of the bad-input suite (tests/test_bad_inputs.py): import minidiff.cli once, fork per case.

Run as `python tests/bad_inputs_server.py` with OPENBLAS_NUM_THREADS=1 (and friends) in the environment, so
that no BLAS or worker thread exists when it forks. It reads one JSON request per line on stdin and answers
one JSON line on stdout:

    request   {"argv": [...], "cwd": DIR, "timeout": s, "as_bytes": n[, "fsize": n]}  cli.main(argv)
              {"call": "module:function", "args": [...], ...}                 a library call (load_pretrained)
    answer    {"rc": exit status, "stdout": text, "stderr": text, "seconds": s, "timed_out": bool}

The child makes itself a process group (so a timeout kills any worker it started), caps its address space
(resource.setrlimit(RLIMIT_AS); with "fsize", RLIMIT_FSIZE too: a file past it fails with EFBIG like a full
disk), sends fd 1 and 2 to files and ends with os._exit(status). A library call
that raises is reported as cli.main would report it (cli.classify_error: one line, its exit status); an
exception classify_error does not know (a bug) prints its traceback and exits 70, as would an uncaught one.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback

BUG = 70  # a traceback: what `python -m minidiff` would exit with is 1, but this one must never be confused


def child(req: dict, out_path: str, err_path: str) -> None:
    """In the forked child: cap, redirect, run, _exit. Never returns."""
    code = BUG
    try:
        os.setpgid(0, 0)
        cap = int(req.get("as_bytes", 0))
        if cap:
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        fsize = int(req.get("fsize", 0))
        if fsize:  # a file may grow to fsize bytes; past it write() fails with EFBIG, as on a full disk
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        os.chdir(req["cwd"])
        for fd, path in ((1, out_path), (2, err_path)):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from minidiff import cli

        if "call" in req:
            module, _, name = req["call"].partition(":")
            import importlib

            try:
                getattr(importlib.import_module(module), name)(*req.get("args", []))
                code = 0
            except Exception as err:  # as cli.main would report it
                known = cli.classify_error(err)
                if known is None:
                    raise
                code, msg = known
                print(f"minidiff library: error: {' '.join(str(msg).split())}", file=sys.stderr)
        else:
            try:
                code = cli.main(req["argv"])
            except SystemExit as done:  # argparse (--help, a usage error)
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = BUG
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code if isinstance(code, int) else BUG)


def run(req: dict) -> dict:
    """Fork one child for req, wait at most req['timeout'] seconds, collect its output."""
    with tempfile.TemporaryDirectory(prefix="bad-inputs-io-") as io_dir:
        out_path, err_path = os.path.join(io_dir, "out"), os.path.join(io_dir, "err")
        start = time.monotonic()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            child(req, out_path, err_path)
        deadline, timed_out, status = start + float(req.get("timeout", 60)), False, None
        while status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
            elif time.monotonic() > deadline:
                timed_out = True
                for target in (-pid, pid):  # the child's group (any workers), then the child
                    try:
                        os.kill(target, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                status = os.waitpid(pid, 0)[1]
            else:
                time.sleep(0.005)
        try:  # a timed-out child's workers, if any are left
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        rc = os.waitstatus_to_exitcode(status)

        def text(path):
            try:
                with open(path, "rb") as f:
                    return f.read(1 << 20).decode("utf-8", "replace")
            except OSError:
                return ""

        return {"rc": rc, "stdout": text(out_path), "stderr": text(err_path),
                "seconds": round(time.monotonic() - start, 3), "timed_out": timed_out}


def main() -> None:
    answers = os.fdopen(os.dup(1), "w")  # our answers; fd 1 itself goes to /dev/null (imports may print)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    import minidiff.cli  # noqa: F401  once, before any fork (imports numpy; no thread with OPENBLAS_NUM_THREADS=1)

    answers.write(json.dumps({"ready": True, "threads": len(os.listdir("/proc/self/task"))
                              if os.path.isdir("/proc/self/task") else 1}) + "\n")
    answers.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        answers.write(json.dumps(run(json.loads(line))) + "\n")
        answers.flush()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
