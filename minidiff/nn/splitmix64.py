"""SplitMix64 (Steele, Lea & Flood 2014; Vigna's splitmix64.c) as a counter-based generator: the
i-th output is a pure function of (key, i), so any range of a stream is computed directly, with
whole-array integer ops, on NumPy and CuPy alike, bit for bit.

    state_i = key + (i + 1) * 0x9E3779B97F4A7C15                  (mod 2^64)
    z = (state_i ^ (state_i >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    out_i = z ^ (z >> 31)

out_0, out_1, ... are the outputs of the reference generator seeded with key (seed 1234567 gives
6457827717110365317, 3203168211198807973, ...). Dropout draws its masks from it (dropout.py): a
GPU draws them on the GPU, a shard of a batch draws only its own rows, and both get the numbers
the whole batch would have on a CPU.

Shape legend: n = stop - start outputs.
"""

from __future__ import annotations

import numbers

import numpy as np

GAMMA = np.uint64(0x9E3779B97F4A7C15)  # the golden-ratio increment of the state
MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
SHIFTS = (np.uint64(30), np.uint64(27), np.uint64(31))


def check_key(name: str, key) -> int:
    """An integer key (any size, taken mod 2^64) as a Python int; bool and non-integers refused."""
    if isinstance(key, bool) or not isinstance(key, numbers.Integral):
        raise ValueError(f"{name} must be an integer (taken mod 2^64), got {key!r}")
    return int(key) % 2**64


def splitmix64(key: int, start: int, stop: int, xp=np):
    """out_i for i in [start, stop), a uint64 array (n,) on xp (numpy or cupy)."""
    z = xp.arange(start + 1, stop + 1, dtype=np.uint64)  # i + 1
    z *= GAMMA
    z += np.uint64(check_key("key", key))  # state_i = key + (i + 1) gamma
    z ^= z >> SHIFTS[0]
    z *= MIX1
    z ^= z >> SHIFTS[1]
    z *= MIX2
    z ^= z >> SHIFTS[2]
    return z
