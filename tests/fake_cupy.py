"""A stand-in for CuPy made of NumPy, so that the GPU code paths run on a machine without a GPU.

minidiff's fast ops (minidiff.fast, the FAST table) pick their code by backend: `xp is not np` runs the
CUDA kernels (SiLU, GroupNorm with and without SiLU, AdamW and the EMA, the sampler's reverse step),
FAST's conv with its im2col, col2im and bias kernels and the whole batch at once (no chunks, no
Winograd); the REFERENCE ops run their plain array ops on CuPy too. The flat buffers go in one piece,
the dropout masks drawn on "the device", the loss read every --log-every steps. With install(),
backend.import_cupy() returns this module and its arrays (FakeDeviceArray, an ndarray subclass
whose type claims to come from cupy) count as CuPy arrays, so all of those run here, on NumPy
underneath: any logic error in them shows, and so does any read back to the host (to_numpy).

Reads of a device value by the host (float(a), bool(a), int(a), a.item(), a.tolist(): each a
sync on a GPU) are recorded in IMPLICIT_READS, which the checks of the steps expect to stay empty.
Device operations (ufunc calls, slice assignments, copies, casts, kernels and NumPy calls on
device arrays: about one kernel launch each on CuPy) and host -> device copies are counted in
LAUNCHES; count(fn) gives those of one call.

What it cannot show: where CuPy's API differs from NumPy's, and anything about speed or CUDA.
The ElementwiseKernels and ReductionKernels minidiff defines are emulated by name, from the
formulas of their bodies (so a fake run checks the Python around a kernel, not its CUDA text).

Shape legend: none; arrays of any shape pass through.
"""

from __future__ import annotations

import types

import numpy as np


LAUNCHES = {"ops": 0, "h2d": 0}  # device array operations (~ kernel launches or cuBLAS calls on CuPy), host -> device copies
_INSIDE = [0]  # > 0 while one counted operation runs its NumPy stand-in (its inner steps are not launches)


class _Launch:
    """Count one device operation, and none for whatever NumPy does inside it."""

    def __enter__(self):
        if not _INSIDE[0]:
            LAUNCHES["ops"] += 1
        _INSIDE[0] += 1

    def __exit__(self, *exc):
        _INSIDE[0] -= 1


def _host(a):
    return a.view(np.ndarray) if isinstance(a, FakeDeviceArray) else a


class FakeDeviceArray(np.ndarray):
    """An array "on the device": backend.is_cupy_array says True; .get() copies it to the host.
    Every ufunc call (elementwise, reduction, .at), slice assignment, copy and cast on it counts as
    one device operation in LAUNCHES, as each is one kernel launch on CuPy (roughly: CuPy's mean is
    one kernel where NumPy's is two ufuncs)."""

    def get(self):
        return np.array(self.view(np.ndarray), copy=True)

    def __getitem__(self, key):  # a[i] of CuPy is a 0-d device array, never a host scalar
        out = super().__getitem__(key)
        return out if isinstance(out, np.ndarray) else np.asarray(out).view(FakeDeviceArray)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        with _Launch():
            result = getattr(ufunc, method)(*(_host(i) for i in inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return None if method == "at" else _device(result)

    def __setitem__(self, key, value):
        with _Launch():
            self.view(np.ndarray)[key] = _host(value)

    def copy(self, order="C"):
        with _Launch():
            return self.view(np.ndarray).copy(order).view(FakeDeviceArray)

    def astype(self, dtype, order="K", casting="unsafe", subok=True, copy=True):
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        with _Launch():
            return self.view(np.ndarray).astype(dtype, order, casting).view(FakeDeviceArray)


FakeDeviceArray.__module__ = "cupy._fake"  # backend.is_cupy_array looks at the type's top-level module

IMPLICIT_READS: list = []  # (what, shape) of each float(a), bool(a), a.item(), ... of a device array


def _implicit_read(name):
    """A conversion that reads a device array's value on the host: on a GPU it waits for the GPU (a sync)."""
    def read(self, *args):
        IMPLICIT_READS.append((name, self.shape))
        return getattr(self.view(np.ndarray), name)(*args)
    read.__name__ = name
    return read


for _name in ("__float__", "__int__", "__bool__", "__index__", "__complex__", "item", "tolist"):
    setattr(FakeDeviceArray, _name, _implicit_read(_name))


def _device(a):
    """Results become device arrays, NumPy scalars 0-d ones as CuPy returns them (dtypes, Python
    numbers and tuples pass through)."""
    if isinstance(a, np.ndarray) and not isinstance(a, FakeDeviceArray):
        return a.view(FakeDeviceArray)
    if isinstance(a, np.generic):
        return np.asarray(a).view(FakeDeviceArray)
    if isinstance(a, tuple):
        return tuple(_device(x) for x in a)
    return a


_NO_LAUNCH = {"empty", "empty_like", "broadcast_to", "swapaxes", "as_strided", "result_type"}  # views, allocations


def _wrap(fn):
    name = getattr(fn, "__name__", "fn")

    def call(*args, **kwargs):
        if name in _NO_LAUNCH or (name == "ascontiguousarray" and args[0].flags.c_contiguous):  # no copy made
            return _device(fn(*args, **kwargs))
        with _Launch():
            return _device(fn(*args, **kwargs))
    call.__name__ = name
    return call


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _adam_update(g, keep, wd, beta1, c1, beta2, c2, bc2_sqrt, eps, step_size, p, m, v):
    """minidiff_adam_update's body line for line (NumPy casts the Python scalars to the buffers' dtype, as the
    kernel's T parameters do); returns the new (p, m, v)."""
    gw = g + wd * p
    p = p * keep
    m = m * beta1 + c1 * gw
    v = v * beta2 + c2 * (gw * gw)
    p = p - step_size * (m / (np.sqrt(v) / bc2_sqrt + eps))
    return p, m, v


def _silu(h):
    return h * _sigmoid(h)


def _silu_grad(h, dy):  # the device function minidiff_silu_grad (fast/cuda/silu.py's SILU_CUDA)
    return ((1 - _sigmoid(h)) * h + 1) * _sigmoid(h) * dy


def _reverse_step(model_output, x, z, ca, cb, ptype, clip, lo, hi, recompute_eps, k0, k1, use_eps, noisy, ks):
    """minidiff_reverse_step's body (sampler_cuda.py) line for line, the T scalars rounded to x's dtype as the
    kernel's parameters are; returns (prev_sample, pred_original_sample)."""
    ca, cb, lo, hi, k0, k1, ks = (x.dtype.type(c) for c in (ca, cb, lo, hi, k0, k1, ks))
    with np.errstate(divide="ignore", invalid="ignore"):
        if ptype == 0:
            eps = model_output
            x0 = (x - cb * eps) / ca
        elif ptype == 1:
            x0 = model_output
            eps = (x - ca * x0) / cb
        else:
            x0 = ca * x - cb * model_output
            eps = ca * model_output + cb * x
        if clip:
            x0 = np.where(x0 < lo, lo, np.where(x0 > hi, hi, x0))
        if recompute_eps:
            eps = (x - ca * x0) / cb
    p = k0 * x0 + k1 * (eps if use_eps else x)
    if noisy:
        p = p + ks * z
    return p, x0


_KERNELS = {  # the ElementwiseKernels of minidiff, by name: the formulas of their bodies
    "minidiff_silu_forward": lambda x: x * _sigmoid(x),
    "minidiff_silu_backward": lambda x, dy: ((1 - _sigmoid(x)) * x + 1) * _sigmoid(x) * dy,
    "minidiff_gn_apply": lambda x, mean, rstd, gamma, beta: (x - mean) * (rstd * gamma) + beta,
    "minidiff_gn_k": lambda rstd, a1, a2, m: (-(rstd * rstd * rstd) * a2 / m, -rstd * a1 / m),
    "minidiff_gn_backward_apply": lambda dy, x, mean, rstd, gamma, k1, k0: (
        dy * (rstd * gamma) + ((x - mean) * k1 + k0)),
    "minidiff_gn_apply_silu": lambda x, mean, rstd, gamma, beta: _silu((x - mean) * (rstd * gamma) + beta),
    "minidiff_gn_silu_backward_apply": lambda dy, x, mean, rstd, gamma, beta, k1, k0: (
        _silu_grad((x - mean) * (rstd * gamma) + beta, dy) * (rstd * gamma) + ((x - mean) * k1 + k0)),
    "minidiff_reverse_step": _reverse_step,
}
def _flat_index_parts(size, dims):
    """The kernels' index split: i -> (i % dims[-1], ...), last dim first, as C integer division does it."""
    r, parts = np.arange(size), []
    for d in reversed(dims):
        parts.append(r % d)
        r = r // d
    return parts[::-1]


def _im2col_kernel(x, N, C, H, W, kh, kw, s, pt, pl, Ho, Wo, col):
    """im2col's columns entry by entry from their flat index i, vectorized (x raw: its flat contiguous
    entries): what minidiff_im2col_* writes (its grid walks the same entries)."""
    c, ti, tj, n, oh, ow = _flat_index_parts(col.size, (C, kh, kw, N, Ho, Wo))
    h, w = s * oh + ti - pt, s * ow + tj - pl
    inside = (h >= 0) & (h < H) & (w >= 0) & (w < W)
    src = np.where(inside, ((n * C + c) * H + h) * W + w, 0)
    return (np.where(inside, _host(x).reshape(-1)[src], 0).astype(col.dtype).reshape(col.shape),)


def _col2im_kernel(dcols, N, C, H, W, kh, kw, s, pt, pl, Ho, Wo, dx):
    """minidiff_col2im's body, vectorized over i; the taps added in the kernel's order."""
    c, n, h, w = _flat_index_parts(dx.size, (C, N, H, W))
    flat, acc = _host(dcols).reshape(-1), np.zeros(dx.size, dx.dtype)
    for ti in range(kh):
        hs = h + pt - ti
        ok_h = (hs >= 0) & (hs % s == 0) & (hs // s < Ho)
        for tj in range(kw):
            ws = w + pl - tj
            ok = ok_h & (ws >= 0) & (ws % s == 0) & (ws // s < Wo)
            src = np.where(ok, ((((c * kh + ti) * kw + tj) * N + n) * Ho + hs // s) * Wo + ws // s, 0)
            acc += np.where(ok, flat[src], 0)
    return (acc.reshape(dx.shape),)


_UPDATES = {  # and its kernels that write outputs passed in: the new values of the outputs, from the inputs and the old outputs
    "minidiff_adam_update": _adam_update,
    "minidiff_col2im": _col2im_kernel,
    "minidiff_col2im32": _col2im_kernel,
    "minidiff_bias_nchw32": lambda ycol, b, C, n, L, has_bias, y: ((
        _host(ycol).reshape(C, n, L) + (_host(b)[:, None, None] if has_bias else 0)).transpose(1, 0, 2).reshape(y.shape),),
    "minidiff_ema_update": lambda p, c, e: (e - c * (e - p),),
}
_REDUCTIONS = {  # and its ReductionKernels: (the mapped value, summed over `axis`; the post-map of the sum a)
    "minidiff_gn_dot_centered": (lambda dy, x, m: dy * (x - m), None),
    "minidiff_gn_dot": (lambda u, v: u * v, None),
    "minidiff_gn_silu_grad_sum": (lambda dy, x, m, rstd, gamma, beta: _silu_grad((x - m) * (rstd * gamma) + beta, dy),
                                  None),
    "minidiff_gn_silu_grad_dot_centered": (lambda dy, x, m, rstd, gamma, beta: (
        _silu_grad((x - m) * (rstd * gamma) + beta, dy) * (x - m)), None),
}


def _gn_stats(grid, block, args):
    """minidiff_gn_stats_*: per row of x (rows, M), mean = sum x / M and rstd = 1 / sqrt(sum (x - mean)^2 / M + eps)."""
    x, mean, rstd, m, eps = args
    rows = x.reshape(grid[0], int(m))
    mu = rows.sum(axis=1) / x.dtype.type(m)
    mean[...] = mu.reshape(mean.shape)
    var = ((rows - mu[:, None]) ** 2).sum(axis=1) / x.dtype.type(m)
    rstd[...] = (1 / np.sqrt(var + eps)).reshape(rstd.shape)


def _im2col_raw(grid, block, args):
    """minidiff_im2col_*: _im2col_kernel's entries, written into cols."""
    x, cols, *sizes = args
    cols[...] = _im2col_kernel(x, *(int(v) for v in sizes), cols)[0]


_RAW = {  # its RawKernels: emulate(grid, block, args) writes the outputs among args
    "minidiff_gn_stats_float": _gn_stats, "minidiff_gn_stats_double": _gn_stats,
    "minidiff_im2col_float": _im2col_raw, "minidiff_im2col_double": _im2col_raw,
}


class _MemoryPool:
    def used_bytes(self):
        return 0

    def total_bytes(self):
        return 0

    def free_all_blocks(self):
        pass


def _kernel_args(name, args):
    """CuPy's kernels take device arrays and scalars (int, float, bool, NumPy scalars); a host array, a 0-d one
    included, is a TypeError there (CuPy: "Unsupported type <class 'numpy.ndarray'>"), so here too."""
    for a in args:
        if isinstance(a, np.ndarray) and not isinstance(a, FakeDeviceArray):
            raise TypeError(f"{name}: Unsupported type {type(a)} (a host array, shape {a.shape}, as a kernel argument)")


class FakeCupy(types.ModuleType):
    """The module: NumPy's functions, with array results moved "to the device"."""

    def __init__(self):
        super().__init__("cupy")
        self.ndarray = FakeDeviceArray
        self.cuda = types.SimpleNamespace(
            runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
            get_current_stream=lambda: types.SimpleNamespace(synchronize=lambda: None))
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=_wrap(np.lib.stride_tricks.as_strided)))
        self.linalg = types.SimpleNamespace(norm=_wrap(np.linalg.norm))
        self.kernels_called = []  # names of the ElementwiseKernels run, for the tests

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeDeviceArray):  # already on the device: a view, or one cast
            return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
        LAUNCHES["h2d"] += 1
        return np.array(a, dtype=dtype, copy=True).view(FakeDeviceArray)  # a copy, as a host -> device one is

    def asnumpy(self, a):
        return np.array(a.view(np.ndarray) if isinstance(a, np.ndarray) else a, copy=True)

    def get_default_memory_pool(self):
        return _MemoryPool()

    def ElementwiseKernel(self, in_params, out_params, body, name, preamble="", options=()):  # noqa: N802
        formula = _KERNELS.get(name)
        if formula is None:  # an in-place update: the outputs are passed in and written
            n_in = len(in_params.split(","))
            update = _UPDATES[name]

            def run(*args):
                _kernel_args(name, args)
                self.kernels_called.append(name)
                with _Launch():
                    for out, value in zip(args[n_in:], update(*args)):
                        out[...] = value
            return run

        def run(*args):
            _kernel_args(name, args)
            self.kernels_called.append(name)
            with _Launch():
                return _device(formula(*args))
        return run

    def ReductionKernel(self, in_params, out_params, map_expr, reduce_expr, post_map_expr, identity,  # noqa: N802
                        name, preamble=""):
        mapped, post = _REDUCTIONS[name]

        def run(*args, axis=None):
            _kernel_args(name, args)
            self.kernels_called.append(name)
            with _Launch():
                a = mapped(*args).sum(axis=axis)
                return _device(a if post is None else post(a, *args))
        return run

    def RawKernel(self, code, name, options=()):  # noqa: N802
        emulate = _RAW[name]

        def run(grid, block, args, shared_mem=0):
            _kernel_args(name, args)
            self.kernels_called.append(name)
            with _Launch():
                emulate(grid, block, args)
        return run

    def __getattr__(self, name):
        value = getattr(np, name)
        if isinstance(value, np.ufunc) or isinstance(value, type) or not callable(value):
            return value  # ufuncs keep the subclass of their inputs; dtypes and constants as they are
        return _wrap(value)


def count(fn) -> dict:
    """{"ops": device operations, "h2d": host -> device copies} that fn() makes on the fake."""
    before = dict(LAUNCHES)
    fn()
    return {k: LAUNCHES[k] - before[k] for k in LAUNCHES}


def install(monkeypatch) -> FakeCupy:
    """Make minidiff's backend see the fake as CuPy with one GPU (undone by monkeypatch at the test's end)."""
    from minidiff import backend
    from minidiff.fast.cuda import optim as optim_cuda
    from minidiff.fast.cuda import sampler as sampler_cuda
    from minidiff.fast.cuda import groupnorm as groupnorm_cuda
    from minidiff.fast.cuda import silu as silu_cuda
    from minidiff.fast.cuda import im2col as im2col_cuda

    fake = FakeCupy()
    monkeypatch.setattr(backend, "_CUPY", fake)
    monkeypatch.setattr(silu_cuda, "_KERNELS", {})  # kernels made by the fake, dropped afterwards
    monkeypatch.setattr(groupnorm_cuda, "_KERNELS", {})
    monkeypatch.setattr(optim_cuda, "_KERNELS", {})
    monkeypatch.setattr(im2col_cuda, "_KERNELS", {})
    monkeypatch.setattr(sampler_cuda, "_KERNELS", {})
    return fake
