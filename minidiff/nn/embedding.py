"""Sinusoidal timestep embedding (DDPM; diffusers get_timestep_embedding) and table lookup
(PyTorch F.embedding, for class labels), each with its hand-written backward.

Shape legend: N batch, dim embedding width, half = dim // 2 frequencies,
V vocabulary (number of labels), D embedding width of the table, ... any index shape.

Two conventions exist for the sinusoidal embedding, and diffusers exposes both:
  DDPM (Ho et al.'s get_timestep_embedding): [sin, cos], f_k = exp(-ln(max_period) k / (half - 1))
      = flip_sin_to_cos=False, downscale_freq_shift=1   (get_timestep_embedding's defaults)
  improved-/guided-diffusion timestep_embedding, and diffusers UNet2DModel's default:
      [cos, sin], f_k = exp(-ln(max_period) k / half) = flip_sin_to_cos=True, downscale_freq_shift=0
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..backend import get_array_module
from ._check import check_float, check_indices, check_ndim, check_same_backend, check_shape


def _check_number(name: str, v, positive: bool = False) -> float:
    """Raise ValueError unless v is a finite real number (> 0 when positive); return it as a float.

    A Python float keeps the compute dtype (a NumPy float64 scalar would upcast float32 arrays).
    """
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}number, got {v!r}")
    return float(v)


def timestep_embedding_forward(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                               max_period=10000, dtype=None):
    """emb = [sin(a), cos(a)] (or [cos(a), sin(a)] when flip_sin_to_cos), zero-padded to dim,

        a_{n,k} = scale * t_n * f_k,   f_k = exp(-ln(max_period) * k / (half - downscale_freq_shift)),
        k = 0 .. half-1,  half = dim // 2          (diffusers get_timestep_embedding, same op order)

    Inputs:  t (N,) integer or float timesteps (may be fractional); dim >= 1 (odd: one zero column
             at the end); dtype the compute/output dtype: None = t's dtype for float t, float32 for
             integer t (diffusers always uses float32).
    Returns: emb (N, dim), and the cache for timestep_embedding_backward.
    """
    if not hasattr(t, "dtype"):
        t = np.asarray(t)
    t_dtype = np.dtype(t.dtype)
    if not (np.issubdtype(t_dtype, np.integer) or np.issubdtype(t_dtype, np.floating)):
        raise ValueError(f"t must be an integer or floating-point array, got {t_dtype}")
    check_ndim("t", t, 1, "(N,)")
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    dim = int(dim)
    half = dim // 2
    shift = _check_number("downscale_freq_shift", downscale_freq_shift)
    if half > 0 and half == shift:
        raise ValueError(f"downscale_freq_shift must differ from dim // 2 = {half} (it divides by their difference)")
    scale = _check_number("scale", scale)
    log_max_period = math.log(_check_number("max_period", max_period, positive=True))
    if dtype is None:
        dtype = t_dtype if np.issubdtype(t_dtype, np.floating) else np.float32
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not np.issubdtype(dt, np.floating):
        raise ValueError(f"dtype must be None or a floating-point dtype (float32 or float64), got {dtype!r}")
    xp = get_array_module(t)

    exponent = -log_max_period * xp.arange(half, dtype=dt)  # (half,)
    exponent = exponent / (half - shift)  # (half,)
    # f_k = exp(exponent) evaluated in float64 and rounded once to dt: the float32 exp of NumPy,
    # PyTorch and CUDA are each up to 1 ulp off (at different k), and at a ~ 1000 one ulp of f_k
    # moves sin(a) by ~1e-4; this way every backend gets the nearest float32 to f_k
    freqs = xp.exp(exponent.astype(np.float64)).astype(dt, copy=False)  # (half,) f_k
    tf = t.astype(dt)  # (N,) as diffusers' timesteps.float()
    a = scale * (tf[:, None] * freqs[None, :])  # (N, half)
    sin, cos = xp.sin(a), xp.cos(a)  # (N, half) each
    parts = [cos, sin] if flip_sin_to_cos else [sin, cos]
    if dim % 2 == 1:
        parts.append(xp.zeros((t.shape[0], 1), dtype=dt))  # (N, 1) zero pad column
    emb = xp.concatenate(parts, axis=1)  # (N, dim)
    cache = (
        tf,  # (N,) t in the compute dtype; the angles a are recomputed from it (N*half is cheap)
        freqs,  # (half,) the frequencies f_k
        scale,  # the factor in a = scale * t * f
        bool(flip_sin_to_cos),  # column order of emb: [cos, sin] when True
        dim,  # emb's width, to check demb's shape (the pad column gets no gradient)
        t_dtype if np.issubdtype(t_dtype, np.floating) else None,  # dtype of dt; None = t was integer
    )
    return emb, cache


def timestep_embedding_backward(demb, cache):
    """dt_n = sum_k scale * f_k * (demb_sin_{n,k} cos(a_{n,k}) - demb_cos_{n,k} sin(a_{n,k}))

    Inputs:  demb (N, dim), the upstream gradient dL/demb; cache from timestep_embedding_forward.
    Returns: dt (N,) in t's dtype, or None when t was an integer array (no gradient exists).
    """
    tf, freqs, scale, flip, dim, t_dtype = cache
    check_shape("demb", demb, (tf.shape[0], dim), "(N, dim)")
    if t_dtype is None:
        return None
    xp = get_array_module(tf)
    half = freqs.shape[0]
    a = scale * (tf[:, None] * freqs[None, :])  # (N, half) recomputed, as in the forward
    # forward: emb = concatenate([sin, cos] (or [cos, sin] if flip), zero pad) along dim 1
    first, second = demb[:, :half], demb[:, half:2 * half]  # (N, half) each; pad column dropped
    dsin, dcos = (second, first) if flip else (first, second)
    # forward: sin, cos = sin(a), cos(a)
    da = dsin * xp.cos(a) - dcos * xp.sin(a)  # (N, half)
    # forward: a = scale * (t * f)
    dt = (da * freqs[None, :]).sum(axis=1) * scale  # (N,)
    return dt.astype(t_dtype, copy=False)


def timestep_embedding(t, dim, flip_sin_to_cos=False, downscale_freq_shift=1.0, scale=1.0,
                       max_period=10000, dtype=None):
    """The embedding of timestep_embedding_forward without the cache (inference, sampling).

    Returns: emb (N, dim); see timestep_embedding_forward for the equation and options.
    """
    emb, _ = timestep_embedding_forward(t, dim, flip_sin_to_cos, downscale_freq_shift, scale, max_period, dtype)
    return emb


def embedding_forward(ids, weight, check_ids=True):
    """y[...] = weight[ids[...]]   (PyTorch F.embedding: a table lookup, e.g. class labels)

    Inputs:  ids (...) integer array with 0 <= ids < V (checked on the host: CuPy does not raise;
             check_ids=False skips it for callers that checked the ids before copying them to the GPU);
             weight (V, D) float32 or float64.
    Returns: y (..., D) in weight's dtype, and the cache for embedding_backward.
    """
    check_same_backend(ids=ids, weight=weight)
    check_float("weight", weight)
    check_ndim("weight", weight, 2, "(V, D)")
    if check_ids:
        check_indices("ids", ids, weight.shape[0])
    y = weight[ids]  # (..., D)
    cache = (
        ids,  # (...) the looked-up rows, where the backward scatters dy
        weight.shape,  # (V, D) the table's shape (the values are not needed: y is linear in weight)
    )
    return y, cache


def embedding_backward(dy, cache):
    """dweight[v] = sum over positions i with ids[i] = v of dy[i]   (repeated ids are summed)

    Inputs:  dy (..., D), the upstream gradient dL/dy; cache from embedding_forward.
    Returns: dweight (V, D) in dy's dtype (ids have no gradient).
    """
    ids, (v, d) = cache
    check_shape("dy", dy, tuple(ids.shape) + (d,), "(..., D) with ... = ids.shape")
    xp = get_array_module(dy)
    dweight = xp.zeros((v, d), dtype=dy.dtype)  # (V, D)
    # forward: y = weight[ids].  add.at accumulates repeated ids (dweight[ids] += dy would keep
    # only one of them); NumPy's np.add.at and CuPy's cupy.add.at (CuPy >= 12, an atomic scatter-add)
    xp.add.at(dweight, ids.reshape(-1), dy.reshape(-1, d))  # (V, D)
    return dweight
