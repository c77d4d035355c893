"""minidiff's CuPy kernels compiled as CuPy would compile them for an H100, with no GPU needed.

CuPy builds each ElementwiseKernel / ReductionKernel's CUDA source only when it is first called on a
device. Here CuPy's own code generators (_kernel._get_elementwise_kernel_code and
_reduction._ReductionKernel_get_cached_function_code, CuPy internals) write that source for
float32 and float64 arguments, contiguous 1-d and strided 4-d (the layouts the calls use), and
NVRTC compiles it with CuPy's headers and options to sm_90 code: a typo, an undeclared name, a
type error in a kernel body or its preamble fails here, in CI, before any GPU session. It says
nothing about the numbers (tests/test_gpu_parity.py on a GPU; tests/fake_cupy.py emulates the formulas).

Runs where CuPy and NVRTC import (pip install cupy-cuda13x==14.2.0 nvidia-cuda-nvrtc==13.0.88; CI
installs them; cupy-cuda12x with nvidia-cuda-nvrtc-cu12 12.9 passes too), and skips otherwise, or when this CuPy's internals differ from what it expects (checked
against CuPy 14).

Shape legend: none; kernels are compiled, not run.
"""

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")

try:  # CuPy internals: the source generators, the argument descriptions, the compiler
    from cupy._core import _carray, _kernel, _reduction, _scalar, core
    from cupy.cuda import compiler

    _NDARRAY, _INDEXER, _SCALAR = 1, 2, 3  # _kernel._ArgKind
    _GEN_ELEMENTWISE = _kernel._get_elementwise_kernel_code
    _GEN_REDUCTION = _reduction._ReductionKernel_get_cached_function_code
except (ImportError, AttributeError) as err:  # pragma: no cover (another CuPy)
    pytest.skip(f"this CuPy's kernel internals differ from CuPy 14's ({err})", allow_module_level=True)

from minidiff.fast.cuda import optim as optim_cuda, sampler as sampler_cuda  # noqa: E402
from minidiff.fast.cuda import groupnorm as groupnorm_cuda, im2col as im2col_cuda, silu as silu_cuda  # noqa: E402

ARCH = "90"  # an H100 (sm_90)
SCALAR_PARAMS = {  # the parameters each kernel's caller passes as Python numbers (the rest are arrays)
    "minidiff_gn_k": {"m"},
    "minidiff_ema_update": {"c"},
    "minidiff_adam_update": {"keep", "wd", "beta1", "c1", "beta2", "c2", "bc2_sqrt", "eps", "step_size"},
    "minidiff_col2im": {"N", "C", "H", "W", "kh", "kw", "s", "pt", "pl", "Ho", "Wo"},
    "minidiff_bias_nchw32": {"C", "n", "L", "has_bias"},
    "minidiff_col2im32": {"N", "C", "H", "W", "kh", "kw", "s", "pt", "pl", "Ho", "Wo"},
    "minidiff_reverse_step": {"ca", "cb", "ptype", "clip", "lo", "hi", "recompute_eps", "k0", "k1", "use_eps",
                              "noisy", "ks"},
}


def _arginfo(kind, dtype=None, ndim=0, contiguous=True):
    typ = {_NDARRAY: cupy.ndarray, _INDEXER: _carray.Indexer, _SCALAR: _scalar.CScalar}[kind]
    return _kernel._ArgInfo(kind, typ, dtype, ndim, contiguous, True)  # 32-bit indexing


def _compile(code: str, name: str, options=()) -> bytes:
    """core.compile_with_cache's steps short of loading the module on a device: CuPy's header and options,
    SASS for sm_90 (CuPy asks the device which architecture to build for; here there is none to ask)."""
    options = core.assemble_cupy_compiler_options(tuple(options))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiler, "_get_arch_for_options_for_nvrtc", lambda arch=None: (f"-arch=sm_{ARCH}", "cubin"))
        out = compiler.compile_using_nvrtc("#include <cupy/carray.cuh>\n" + code, options, ARCH, name + ".cu")
    return out[0] if isinstance(out, tuple) else out


def _source(kernel, dtype, ndim: int, contiguous: bool) -> str:
    """The CUDA source CuPy generates for this kernel called with arrays of this dtype and layout
    (a RawKernel's own source, whole: it takes pointers, one dtype per kernel)."""
    if isinstance(kernel, cupy.RawKernel):
        return kernel.code
    dt = np.dtype(dtype)
    scalars = SCALAR_PARAMS.get(kernel.name, set())
    if isinstance(kernel, cupy.ElementwiseKernel):
        infos = tuple(_arginfo(_SCALAR, dt if p.dtype is None else np.dtype(p.dtype)) if p.name in scalars
                      else _arginfo(_NDARRAY, dt, 4, True) if p.raw  # a raw array keeps its shape: 4-d, contiguous
                      else _arginfo(_NDARRAY, dt, ndim, contiguous)
                      for p in kernel.in_params + kernel.out_params) + (_arginfo(_INDEXER, None, ndim),)
        return _GEN_ELEMENTWISE(infos, _kernel._TypeMap((("T", dt),)), kernel.params, kernel.operation, kernel.name,
                                kernel.preamble, "", "", tuple(kernel.kwargs.get("options", ())))
    out_ndim = max(ndim - 1, 1)  # minidiff reduces over one axis
    infos = (tuple(_arginfo(_SCALAR, dt) if p.name in scalars else _arginfo(_NDARRAY, dt, ndim, contiguous)
                   for p in kernel.in_params)
             + tuple(_arginfo(_NDARRAY, dt, out_ndim) for _ in kernel.out_params)
             + (_arginfo(_INDEXER, None, ndim), _arginfo(_INDEXER, None, out_ndim), _arginfo(_SCALAR, np.dtype(np.int32))))
    type_map = _kernel._TypeMap((("IndexT", np.dtype(np.int32)), ("T", dt)))
    return _GEN_REDUCTION(kernel.nin, kernel.nout, kernel._params, infos, type_map, kernel.name, 512, "T",
                          kernel.identity, kernel.map_expr, kernel.reduce_expr, kernel.post_map_expr, kernel.preamble,
                          tuple(kernel.options))


def _options(kernel):
    if isinstance(kernel, cupy.RawKernel):
        return kernel.options
    return kernel.kwargs.get("options", ()) if isinstance(kernel, cupy.ElementwiseKernel) else kernel.options


@pytest.fixture(scope="module")
def kernels():
    """Every kernel minidiff defines, made by the real CuPy (the modules' caches are restored afterwards)."""
    with pytest.MonkeyPatch.context() as mp:
        found = {}
        for module, make in ((silu_cuda, silu_cuda._kernels), (groupnorm_cuda, groupnorm_cuda._kernels),
                             (optim_cuda, optim_cuda._kernels), (im2col_cuda, im2col_cuda._kernels),
                             (sampler_cuda, sampler_cuda._kernels)):
            mp.setattr(module, "_KERNELS", {})
            found.update({k.name: k for k in make(cupy).values()})
    try:
        _compile(_source(cupy.ElementwiseKernel("T x", "T y", "y = x;", "minidiff_probe"), np.float32, 1, True),
                 "minidiff_probe")
    except Exception as err:  # no NVRTC library, or a compiler API unlike CuPy 14's
        pytest.skip(f"cannot compile with NVRTC here ({type(err).__name__}: {err}); "
                    "pip install nvidia-cuda-nvrtc-cu12")
    return found


KERNEL_NAMES = [
    "minidiff_silu_forward", "minidiff_silu_backward",
    "minidiff_gn_stats_float", "minidiff_gn_stats_double", "minidiff_gn_dot_centered", "minidiff_gn_dot",
    "minidiff_gn_apply", "minidiff_gn_k",
    "minidiff_gn_backward_apply", "minidiff_gn_apply_silu", "minidiff_gn_silu_grad_sum",
    "minidiff_gn_silu_grad_dot_centered", "minidiff_gn_silu_backward_apply",
    "minidiff_adam_update", "minidiff_ema_update", "minidiff_reverse_step",
    "minidiff_im2col_float", "minidiff_im2col_double", "minidiff_col2im", "minidiff_col2im32", "minidiff_bias_nchw32",
]


def test_the_list_names_every_kernel(kernels):
    assert sorted(kernels) == sorted(KERNEL_NAMES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", KERNEL_NAMES)
def test_kernel_compiles_for_sm90(kernels, name, dtype):
    kernel = kernels[name]
    for ndim, contiguous in ((1, True), (4, False)):
        code = _source(kernel, dtype, ndim, contiguous)
        assert f"void {name}(" in code
        assert len(_compile(code, name, _options(kernel))) > 0


def test_a_broken_body_fails_to_compile(kernels):
    """The check can fail: an undeclared name in a body is a compile error, as on a GPU."""
    bad = cupy.ElementwiseKernel("T x", "T y", "y = minidiff_undeclared(x);", "minidiff_broken")
    with pytest.raises(Exception, match="minidiff_undeclared"):
        _compile(_source(bad, np.float32, 1, True), "minidiff_broken")
