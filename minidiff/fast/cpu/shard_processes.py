"""The batch's shards in worker processes instead of threads (shards.py, --shards processes).

    L = sum_k (N_k / N) L_k,        dL/dtheta = sum_k (N_k / N) dL_k/dtheta      (as shards.py)

Why processes: threads share one GIL, and a U-Net step is thousands of small NumPy calls whose
Python and dispatch overhead holds it; two shards' overheads then queue for it. Measured on
2 cores (`small`, one forward per thread or process, batch 32 each): 16x16 alone 69 ms, two at once
96 ms in threads and 80 ms in processes; 32x32 alone 258 ms, two at once 357 ms and 290 ms.

Each worker is a fresh interpreter (the "spawn" start method: safe beside the parent's threads,
OpenBLAS's and PyTorch's included) that runs the same function on its rows as a thread would (for
training, training/trainer.py's loss_and_grads), so the results are the threads' bit for bit. The worker
imports that function by its module and name, and gets the ops table by its name ("fast": FAST, run
in one piece). What travels:
  weights    one shared file in /dev/shm (where there is one) holding the flat buffer, copied in
             by the parent before each call (one memcpy: the optimizer updates the parent's copy)
  gradients  one shared file per worker, the flat buffer of dL_k/dtheta, summed by the parent
  the rest   messages of a JSON header and the arrays' raw bytes (shard_messages.py): the function's
             name, the shard's rows of the batch (dropout masks included), the other shared arguments
             (config, schedule, ops) encoded as JSON and arrays; no pickle anywhere
A script that uses this must guard its entry point (if __name__ == "__main__":), as every spawned
worker imports the parent's main module.

Shape legend: N batch, N_k rows of shard k, P the flat buffer's length.
"""

from __future__ import annotations

import atexit
import itertools
import multiprocessing
import os
import signal
import traceback

import numpy as np

from .. import flat
from .shard_messages import by_name, decode, encode, flat_view, pack, qualified_name, shared_file, unlink, unpack

_POOLS: dict = {}  # workers -> ShardProcesses, started on first use, closed at exit
_IDS = itertools.count()  # the shared files' ids, by which the workers keep their mappings


# ----------------------------------------------------------------------------- the worker


def _mapped(files: dict, role: str, desc: dict, layout, mode: str) -> flat.FlatDict:
    """This worker's view of the shared file for role ('params' or 'grads'), mapped once per file: the
    parent deletes a file once its workers have it mapped, and sends a new one (new id) to replace it."""
    if files.get(role, (None,))[0] != desc["id"]:
        files[role] = (desc["id"], flat_view(desc["path"], desc["dtype"], layout, mode))
    return files[role][1]


def _run(meta: dict, arrays: dict, files: dict) -> tuple[dict, dict]:
    """One task in a worker: out = fn(shard, **shared) ('forward'), or (L_k, grads_k) = fn(shard, **shared)
    with grads_k written into this worker's shared gradient file ('loss_and_grads')."""
    p = meta["params"]
    shared = decode(meta["shared"], arrays)
    shared["params"] = _mapped(files, "params", p, p["layout"], "r")
    out = by_name(meta["fn"])(decode(meta["batch"], arrays), **shared)
    if meta["task"] == "forward":
        return {}, {"out": out}
    loss, grads = out
    view = _mapped(files, "grads", meta["grads"], p["layout"], "r+")
    for k, _ in view.layout:  # dL_k/dtheta into the shared buffer (the gaps stay zero)
        view[k][...] = grads[k]
    return {}, {"loss": np.asarray(loss)}


def _worker_main(conn, blas_threads: int) -> None:
    """A worker's loop: answer each message with ok + results, or with the error, until told to stop or
    until the parent's end of the pipe closes (Ctrl-C is the parent's to handle: the worker ignores it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from threadpoolctl import threadpool_limits  # noqa: PLC0415

        threadpool_limits(blas_threads, user_api="blas")
    except ImportError:
        pass
    from .allocator import keep_freed_memory  # noqa: PLC0415

    keep_freed_memory()
    files: dict = {}
    while True:
        try:
            meta, arrays = unpack(conn.recv_bytes())
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if meta.get("task") == "stop":
            return
        try:
            reply, out = _run(meta, arrays, files)
            conn.send_bytes(pack({"ok": True, **reply}, out))
        except Exception as err:  # noqa: BLE001  (sent back and raised in the parent)
            conn.send_bytes(pack({"ok": False, "type": type(err).__name__, "error": str(err),
                                  "traceback": traceback.format_exc()}, {}))


# ----------------------------------------------------------------------------- the parent


class ShardProcesses:
    """`workers` worker processes, their pipes, and the shared files of the weights and gradients."""

    def __init__(self, workers: int, blas_threads: int = 1):
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        self.files = {}  # role -> (description, (dtype, layout), this process's view, workers that mapped it)
        self.deleted = set()  # paths of the files already deleted (every worker that uses them has them mapped)
        for k in range(workers):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, blas_threads), name=f"minidiff-shard-{k}",
                               daemon=True)
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)

    def _view(self, role: str, dtype, layout: tuple) -> tuple[dict, flat.FlatDict]:
        """The shared file for role ('params', 'grads0', ...): its description for the workers, and this
        process's FlatDict over it; a new file (and id) when the dtype or layout changed."""
        desc, key, view, _ = self.files.get(role, (None, None, None, None))
        if key != (np.dtype(dtype).str, layout):
            if desc is not None:
                unlink(desc["path"])
            desc = {"path": shared_file(flat.buffer_size(layout) * np.dtype(dtype).itemsize),
                    "id": f"{os.getpid()}-{next(_IDS)}", "dtype": np.dtype(dtype).str}
            view = flat_view(desc["path"], desc["dtype"], layout, "r+")
            self.files[role] = (desc, (desc["dtype"], layout), view, set())
        return desc, view

    def share_params(self, params) -> dict:
        """Copy params (a dict of same-dtype NumPy arrays) into the shared weights file; its description.
        The file is mapped shared, so the workers see the copy without a flush."""
        layout = flat.layout_of(params)
        dtype = next(iter(params.values())).dtype
        desc, shared = self._view("params", dtype, layout)
        if isinstance(params, flat.FlatDict) and params.intact():
            np.copyto(shared.buffer, params.buffer)
        else:
            for key, a in params.items():
                shared[key][...] = a
        return {**desc, "layout": [[k, list(s)] for k, s in layout]}

    def grads(self, k: int, params_desc: dict) -> tuple[dict, flat.FlatDict]:
        """Worker k's shared gradient file: its description, and this process's view of it."""
        layout = tuple((key, tuple(s)) for key, s in params_desc["layout"])
        return self._view(f"grads{k}", params_desc["dtype"], layout)

    def run(self, messages: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
        """Send message k to worker k, then read every answer (all of them, so that none is left in a pipe
        for the next call); raise the first error: a worker's ValueError as ValueError (bad input, the same
        one line as in threads), anything else, or a worker that died, as RuntimeError."""
        for k, (meta, arrays) in enumerate(messages):
            try:
                self.conns[k].send_bytes(pack(meta, arrays))
            except OSError as err:
                self._died(k, err)
        answers = []
        for k in range(len(messages)):
            try:
                answers.append(unpack(self.conns[k].recv_bytes()))
            except (EOFError, OSError) as err:
                self._died(k, err)
        for k, (meta, _) in enumerate(answers):
            if not meta.get("ok"):
                if meta["type"] == "ValueError":
                    raise ValueError(meta["error"])
                raise RuntimeError(f"shard worker {k} failed: {meta['type']}: {meta['error']}\n{meta['traceback']}")
        for k, (meta, _) in enumerate(messages):  # worker k has mapped the files it was sent
            used = {meta["params"]["id"], meta.get("grads", {}).get("id")}
            for desc, _, _, mapped in self.files.values():
                if desc["id"] in used:
                    mapped.add(k)
        for role, (desc, _, _, mapped) in self.files.items():  # once all its users have it mapped, a file
            users = {int(role[5:])} if role.startswith("grads") else set(range(len(self.conns)))
            if mapped >= users and desc["path"] not in self.deleted:  # can go: a run killed later leaves none
                unlink(desc["path"])
                self.deleted.add(desc["path"])
        return answers

    def _died(self, k: int, err: Exception):
        self.procs[k].join(timeout=1)
        code = self.procs[k].exitcode
        self.close()
        raise RuntimeError(f"shard worker {k} exited (exit code {code}) during a step; a script that runs several "
                           f"shards in processes must guard its entry point (if __name__ == '__main__':); "
                           f"--shards threads (shards='threads') runs them in this process") from err

    def close(self) -> None:
        """Stop the workers (terminated after 5 s), delete the shared files, forget this pool."""
        for conn in self.conns:
            try:
                conn.send_bytes(pack({"task": "stop"}, {}))
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
        for desc, _, _, _ in self.files.values():
            unlink(desc["path"])
        self.files.clear()
        for key in [w for w, pool in _POOLS.items() if pool is self]:
            del _POOLS[key]


def get_pool(workers: int, blas_threads: int) -> ShardProcesses:
    """A pool of at least this many workers (a smaller batch uses the first ones), started on first use."""
    for size, pool in _POOLS.items():
        if size >= workers:
            return pool
    pool = _POOLS[workers] = ShardProcesses(workers, blas_threads)
    return pool


@atexit.register
def _close_all() -> None:
    for pool in list(_POOLS.values()):
        pool.close()


def _messages(task: str, pool: ShardProcesses, fn, pieces: list, shared: dict) -> list[tuple[dict, dict]]:
    """Message k: fn's name, the batch's piece k (its rows of the batch), and shared (params by its shared
    file, the rest encoded; one encoding for every worker)."""
    shared = dict(shared)
    params = shared.pop("params", None)
    if params is None:
        raise ValueError("shared must hold params (a dict of arrays) to run the shards in processes")
    desc = pool.share_params(params)
    shared_arrays: dict = {}
    meta = {"task": task, "fn": qualified_name(fn), "params": desc, "shared": encode(shared, shared_arrays, "shared")}
    messages = []
    for k, piece in enumerate(pieces):
        batch_arrays: dict = {}
        part = {**meta, "batch": encode(piece, batch_arrays, "batch")}
        if task == "loss_and_grads":
            part["grads"] = pool.grads(k, desc)[0]
        messages.append((part, {**shared_arrays, **batch_arrays}))
    return messages


def map_forward(fn, pieces: list, shared: dict, blas_threads: int) -> list:
    """[fn(piece, **shared) for each piece of the batch], piece k in worker k: the threads' numbers bit for bit."""
    pool = get_pool(len(pieces), blas_threads)
    answers = pool.run(_messages("forward", pool, fn, pieces, shared))
    return [arrays["out"] for _, arrays in answers]


def map_batch(fn, pieces: list, shared: dict, blas_threads: int) -> list:
    """[(L_k, grads_k) = fn(piece_k, **shared) for each piece of the batch], piece k in worker k; each grads_k a
    FlatDict when params is one, else a dict (grads_0 a copy, the others views of the shared files,
    rewritten at the next call). Summed by shards.weighted_sum as the threads' are: bit for bit."""
    pool = get_pool(len(pieces), blas_threads)
    answers = pool.run(_messages("loss_and_grads", pool, fn, pieces, shared))
    as_flat = isinstance(shared["params"], flat.FlatDict) and shared["params"].intact()
    parts = []
    for k, (_, arrays) in enumerate(answers):
        view = pool.files[f"grads{k}"][2]
        grads = flat.FlatDict(np.array(view.buffer), view.layout) if k == 0 else view  # grads_0 is summed into
        parts.append((arrays["loss"][()], grads if as_flat else dict(grads)))  # loss: a NumPy scalar, as in threads
    return parts
