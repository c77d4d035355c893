"""Centered finite differences in float64, projected through a random upstream gradient.

For an op y = f(inputs) and a random upstream g, the scalar L = sum(g * y) has
dL/dinput = the op's backward applied to g. Each checked coordinate i of an input
is perturbed by +-h and compared with (L(x + h e_i) - L(x - h e_i)) / (2h).

    rel_error(a, b) = max|a - b| / max(max|a|, max|b|, tiny)
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from minidiff.backend import to_numpy


def needs(*packages: str):
    """A skipif mark for a test that needs optional packages (torch, diffusers), decided before the test runs.

    pytest.importorskip inside a hypothesis test skips only when the first example reaches it, and
    hypothesis then prints that example as "Failing explicit example" although nothing failed.
    """
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {' and '.join(missing)} (optional cross-check)")


def rel_error(a, b) -> float:
    """max|a - b| / max(|a|, |b|), the norm used by every gradient check."""
    a, b = np.asarray(to_numpy(a), np.float64), np.asarray(to_numpy(b), np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-300)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def grads_rel_error(got: dict, want: dict) -> dict:
    """{key: max|got - want| / max(max|got|, max|want|, 1e-6 * the largest gradient of all keys)}.

    The floor is for gradients that are zero in exact arithmetic, such as an attention key bias
    (softmax ignores a shift shared by all keys): both sides then hold rounding noise (~1e-22 in
    float64), which two backends round differently, and plain rel_error would be O(1).
    """
    top = max(max(np.abs(to_numpy(g)).max(initial=0.0) for g in want.values()), 1e-300)
    out = {}
    for key, w in want.items():
        a, b = np.asarray(to_numpy(got[key]), np.float64), np.asarray(to_numpy(w), np.float64)
        scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0), 1e-6 * top)
        out[key] = float(np.abs(a - b).max(initial=0.0) / scale)
    return out


def numeric_grad(loss, x: np.ndarray, h: float = 1e-6, max_coords: int | None = 200, seed: int = 0):
    """Centered differences of the scalar loss() with respect to x (perturbed in place, restored).

    Returns (idx, g): the flat indices that were checked and the numeric gradient there.
    When x has more than max_coords entries, a seeded random subset is checked.
    """
    flat = x.reshape(-1)
    n = flat.size
    if max_coords is None or n <= max_coords:
        idx = np.arange(n)
    else:
        idx = np.random.default_rng(seed).choice(n, size=max_coords, replace=False)
    g = np.empty(idx.size)
    for j, i in enumerate(idx):
        old = flat[i]
        flat[i] = old + h
        lp = loss()
        flat[i] = old - h
        lm = loss()
        flat[i] = old
        g[j] = (lp - lm) / (2 * h)
    return idx, g


def check_grads(forward, inputs: dict, backward_grads, seed: int = 0, h: float = 1e-6,
                max_coords: int | None = 200, tol: float = 1e-7) -> dict:
    """Check analytic gradients against centered differences.

    forward(**inputs) -> y (array). backward_grads(g) -> dict name -> analytic dL/d(name)
    for L = sum(g * y). Every name in that dict is checked; returns name -> rel error.
    Inputs must be float64 NumPy arrays (they are perturbed in place and restored).

    The error is relative to max(|analytic|, |numeric|, noise / tol), where
    noise = eps * sum|g * y| * log2(n + 1) / h bounds the rounding of the differences themselves
    (each L, a sum of n products, is rounded by up to ~log2(n) eps sum|g y|; dividing by h scales it
    up). So a gradient that cancels far below the loss's size is not failed on that rounding: a 1x1
    conv with padding 2 had dw = 1.1e-3 from 4 terms of 0.1-0.6 beside sum|g y| = 7.8, which puts the
    differences' rounding near 1.7e-9 (before the log2 n factor); their error of 2.7e-10 read as
    2.4e-7 relative (found by hypothesis). A wrong backward errs by O(|gradient|), far above this floor.
    """
    rng = np.random.default_rng(seed)
    y = forward(**inputs)
    g = rng.standard_normal(np.shape(y))
    analytic = backward_grads(g)
    y64 = np.asarray(to_numpy(y), np.float64)
    noise = np.finfo(np.float64).eps * float(np.abs(g * y64).sum()) * np.log2(y64.size + 1) / h
    errors = {}
    for name, ga in analytic.items():
        x = inputs[name]
        assert x.dtype == np.float64, f"{name} must be float64 for a gradient check"
        ga = np.asarray(to_numpy(ga), np.float64)
        assert ga.shape == x.shape, f"grad of {name}: {ga.shape} != {x.shape}"
        idx, gn = numeric_grad(lambda: float(np.sum(g * to_numpy(forward(**inputs)))), x, h, max_coords, seed)
        a = ga.reshape(-1)[idx]
        err = float(np.abs(a - gn).max(initial=0.0) / max(np.abs(a).max(initial=0.0), np.abs(gn).max(initial=0.0),
                                                           noise / tol, 1e-300))
        errors[name] = err
        assert err < tol, f"gradient of {name}: relative error {err:.3e} >= {tol:.0e}"
    return errors


def check_network_grads(forward, params: dict, x, g, grads: dict, dx, coords: int, h: float, tol: float,
                        zero_key=lambda key: False) -> None:
    """Whole-network gradient check in float64: forward(params, x) -> output; grads, dx its backward of g.

    1. every parameter key, `coords` sampled coordinates each, against centered differences
       (keys for which zero_key(key) is true must have an exactly-zero gradient, e.g. a self-attention
       key bias, which the softmax ignores);
    2. 12 sampled coordinates of dx;
    3. all parameters at once: the derivative along one random unit direction v of sum(g * output).
    """
    assert list(grads) == list(params) and all(grads[k].shape == params[k].shape for k in params)

    def loss():
        return float(np.sum(g * forward(params, x)))

    for j, key in enumerate(params if coords else []):
        idx, num = numeric_grad(loss, params[key], h=h, max_coords=coords, seed=j)
        ana = grads[key].reshape(-1)[idx]
        if zero_key(key):
            assert np.abs(ana).max() < 1e-12 and np.abs(num).max() < 1e-8, key
        else:
            assert rel_error(ana, num) < tol, (key, rel_error(ana, num))
    idx, num = numeric_grad(loss, x, h=h, max_coords=12)
    assert rel_error(dx.reshape(-1)[idx], num) < tol
    v = {k: np.random.default_rng(3).standard_normal(a.shape) for k, a in params.items()}
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in v.values()))
    v = {k: a / norm for k, a in v.items()}
    shifted = [forward({k: params[k] + s * h * v[k] for k in params}, x) for s in (1, -1)]
    directional = float(np.sum(g * (shifted[0] - shifted[1]))) / (2 * h)
    analytic = sum(float(np.sum(grads[k] * v[k])) for k in params)
    assert abs(directional - analytic) < 1e-7 * abs(analytic), (directional, analytic)


def check_weight_bias_grads(forward, backward, x, w, b, max_coords: int | None = 200) -> dict:
    """check_grads for an op y, cache = forward(x, w, b) with the optional bias b (None: no bias),
    whose backward(dy, cache) returns (dx, dw, db); db must be None exactly when b is."""
    inputs = dict(x=x, w=w) if b is None else dict(x=x, w=w, b=b)

    def backward_grads(g):
        dx, dw, db = backward(g, forward(**inputs)[1])
        assert (db is None) == (b is None) and dx.shape == x.shape and dw.shape == w.shape
        return dict(x=dx, w=dw) if b is None else dict(x=dx, w=dw, b=db)

    return check_grads(lambda **a: forward(**a)[0], inputs, backward_grads, max_coords=max_coords)


def check_weight_bias_against_torch(torch, forward, backward, torch_forward, x, w, b, seed: int,
                                    tol: float = 1e-10) -> None:
    """y and (dx, dw, db) of forward/backward against torch autograd through torch_forward(xt, wt, bt),
    for a random upstream gradient (float64; b None: no bias). torch: the module (tests skip without it)."""
    y, cache = forward(x, w, b)
    dy = np.random.default_rng(seed).standard_normal(y.shape)
    dx, dw, db = backward(dy, cache)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    yt = torch_forward(xt, wt, bt)
    yt.backward(torch.tensor(dy))
    assert rel_error(y, yt.detach().numpy()) < tol
    assert rel_error(dx, xt.grad.numpy()) < tol
    assert rel_error(dw, wt.grad.numpy()) < tol
    assert (db is None) == (b is None)
    if b is not None:
        assert rel_error(db, bt.grad.numpy()) < tol
