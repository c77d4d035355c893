"""Checks that a backward is pure: backward(dy, cache) leaves dy and the cache unchanged and returns new arrays.

DESIGN.md: "Backward returns new arrays and never mutates dy or the cache." The layers' tests import
assert_backward_pure from here (as they import the gradient checks from gradcheck.py).
"""

import numpy as np


def snapshot(obj):
    """A deep copy of the arrays in a (nested) cache, to detect mutation by backward."""
    if isinstance(obj, np.ndarray):
        return obj.copy()
    if isinstance(obj, (tuple, list)):
        return type(obj)(snapshot(o) for o in obj)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    return obj


def assert_same(a, b):
    """Structural equality of two snapshots (arrays compared exactly)."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    else:
        assert a == b


def arrays_in(obj):
    """Every ndarray inside a (nested) cache."""
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [a for o in obj for a in arrays_in(o)]
    if isinstance(obj, dict):
        return [a for o in obj.values() for a in arrays_in(o)]
    return []


def assert_backward_pure(backward, dy, cache, grads):
    """backward(dy, cache) left dy and the cache unchanged and returned arrays sharing no memory with them."""
    dy0, cache0 = dy.copy(), snapshot(cache)
    out = backward(dy, cache)
    assert np.array_equal(dy, dy0)
    assert_same(snapshot(cache), cache0)
    for g in grads + [o for o in out if o is not None]:
        for a in [dy] + arrays_in(cache):
            assert not np.shares_memory(g, a)
