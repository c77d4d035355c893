"""Inference timestep lists and their previous timesteps, as diffusers' set_timesteps emits them.

A sampler visits the emitted list in order (descending); at entry i it steps from t = ts[i] to
prev_t = ts[i + 1], and after the last entry to prev_t = -1 ("before the start").
DDIMScheduler instead steps to t - T // n (ddim_prev_timesteps); both rules are exposed so a
user can reproduce either library choice by passing the list explicitly.

Shape legend: n = num_inference_steps, T = num_train_timesteps. Lists are int64 NumPy arrays (n,).
"""

from __future__ import annotations

import numpy as np

from .schedule import check_choice

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    """Raise ValueError unless value is an int in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {rng}, got {value}")
    return int(value)


def make_timesteps(num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """The descending list of n timesteps (Lin et al. 2023, Table 2; diffusers DDPM/DDIM set_timesteps):

    leading:   ts = [k * (T // n) for k = n-1, ..., 0] + steps_offset
    trailing:  ts = [round(T - k * T / n) - 1 for k = 0, ..., n-1]
    linspace:  ts = round(linspace(0, T - 1, n))[::-1]      (round half to even, as np.round)

    steps_offset applies to 'leading' only (diffusers ignores it for the other two).
    'trailing' reproduces np.arange(T, 0, -T/n) entry by entry (NumPy steps by
    (T - T/n) - T), but always returns exactly n entries: diffusers' arange emits an extra
    entry -1 for some n (e.g. T = 1000, n = 61), which is dropped here.
    Returns int64 array (n,), strictly descending, every entry in [0, T)."""
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int("num_inference_steps", num_inference_steps, 1, T)
    check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
    offset = _check_int("steps_offset", steps_offset, 0)
    if timestep_spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        ts = (np.arange(0, n) * (T // n))[::-1].astype(np.int64) + offset
        if ts[0] >= T:
            raise ValueError(f"steps_offset = {offset} pushes the first 'leading' timestep to {ts[0]} >= "
                             f"num_train_timesteps = {T}; use steps_offset <= {T - 1 - (n - 1) * (T // n)}")
    else:
        step = (T - T / n) - T                     # NumPy's arange step, bit for bit
        ts = np.round(T + np.arange(n) * step).astype(np.int64) - 1
    return np.ascontiguousarray(ts)


def check_timestep_list(name: str, timesteps, num_train_timesteps: int) -> np.ndarray:
    """Validate a custom list: 1-d integers, strictly descending, in [0, T). Returns int64 (n,)."""
    ts = np.asarray(timesteps)
    if ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer) or ts.dtype == np.bool_:
        raise ValueError(f"{name} must be a non-empty 1-d list of ints, got {ts!r}")
    if np.any(np.diff(ts) >= 0):
        raise ValueError(f"{name} must be strictly descending, got {ts.tolist()}")
    if ts[-1] < 0 or ts[0] >= num_train_timesteps:
        raise ValueError(f"{name} must lie in [0, {num_train_timesteps}), got values in [{ts[-1]}, {ts[0]}]")
    return ts.astype(np.int64)


def prev_timesteps(timesteps) -> np.ndarray:
    """prev_t[i] = ts[i + 1], and -1 after the last entry (the rule of diffusers' DDPMScheduler
    .previous_timestep and of minidiff's sample()). Returns int64 (n,)."""
    ts = np.asarray(timesteps, np.int64)
    return np.concatenate([ts[1:], [-1]]).astype(np.int64)


def ddim_prev_timesteps(timesteps, num_train_timesteps: int, num_inference_steps: int) -> np.ndarray:
    """prev_t = t - T // n, with every negative value mapped to -1 (diffusers' DDIMScheduler.step,
    which uses final_alpha_cumprod for any prev_t < 0). Equals prev_timesteps() for 'leading'
    spacing; differs for 'trailing' and 'linspace' when T / n is not an integer. Returns int64 (n,)."""
    ts = np.asarray(timesteps, np.int64)
    return np.maximum(ts - num_train_timesteps // num_inference_steps, -1).astype(np.int64)


def truncating_timesteps(num_train_timesteps: int, num_inference_steps: int):
    """times = int(linspace(-1, T - 1, n + 1)) reversed; ts = times[:-1], prev_t = times[1:]   (truncation)

    The DDIM rule of denoising-diffusion-pytorch (`torch.linspace(-1, T - 1, n + 1).int()`): the same grid
    -1 + k T / n as 'trailing' (which rounds it), truncated toward zero instead, and each step goes to the
    next grid point (the last to -1). Differs from 'trailing' wherever T / n is not an integer.
    Returns (timesteps, prev_timesteps), int64 (n,) each."""
    T = _check_int("num_train_timesteps", num_train_timesteps, 1)
    n = _check_int("num_inference_steps", num_inference_steps, 1, T)
    times = np.linspace(-1, T - 1, n + 1).astype(np.int64)[::-1]  # astype truncates toward zero
    return np.ascontiguousarray(times[:-1]), np.ascontiguousarray(times[1:])
