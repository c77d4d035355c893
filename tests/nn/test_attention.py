"""Tests for minidiff/nn/attention.py: scaled dot-product attention and multi-head attention.

Shape legend: N batch, L query tokens, S key tokens, C width of x, Cc context width, C_out output
width, h heads, D head dim, Dv value head dim, inner = h * D.

Shapes and options are drawn by hypothesis as small integers plus a seed; the arrays are made from
the seed, so every @example below is a readable, fixed edge case.
"""

import copy
import math

import numpy as np
import pytest
from gradcheck import check_grads, needs, numeric_grad, rel_error
from hypothesis import example, given
from hypothesis import strategies as st

from minidiff.nn.attention import mha_backward, mha_forward, sdpa_backward, sdpa_forward

MHA_NAMES = ("x", "context", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")


# ---------------------------------------------------------------- cases and arrays


@st.composite
def sdpa_cases(draw):
    return dict(
        n=draw(st.integers(1, 2)), h=draw(st.integers(1, 3)), l=draw(st.integers(1, 4)),
        s=draw(st.integers(1, 4)), d=draw(st.integers(1, 3)), dv=draw(st.integers(1, 3)),
        mask=draw(st.sampled_from(["none", "random", "one"])), seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def mha_cases(draw):
    cross = draw(st.booleans())
    l, c = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    return dict(
        n=draw(st.integers(1, 2)), l=l, c=c, heads=draw(st.integers(1, 3)), d=draw(st.integers(1, 2)),
        c_out=draw(st.integers(1, 4)), cross=cross,
        s=draw(st.integers(1, 4)) if cross else l, cc=draw(st.integers(1, 4)) if cross else c,
        mask=draw(st.sampled_from(["none", "random", "one"])),
        biases=draw(st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans())),
        seed=draw(st.integers(0, 2**16)),
    )


def make_mask(rng, mode, n, s):
    """None, a random (N, S) bool mask keeping >= 1 key per row, or one kept key per row."""
    if mode == "none":
        return None
    mask = rng.random((n, s)) < 0.5 if mode == "random" else np.zeros((n, s), bool)
    mask[np.arange(n), rng.integers(0, s, size=n)] = True
    return mask


def sdpa_arrays(case, dtype=np.float64):
    rng = np.random.default_rng(case["seed"])
    n, h, l, s, d, dv = (case[key] for key in ("n", "h", "l", "s", "d", "dv"))
    arrays = dict(q=rng.standard_normal((n, h, l, d)), k=rng.standard_normal((n, h, s, d)),
                  v=rng.standard_normal((n, h, s, dv)))
    return {key: a.astype(dtype) for key, a in arrays.items()}, make_mask(rng, case["mask"], n, s)


def mha_arrays(case, dtype=np.float64):
    """x, context (None for self-attention), weights scaled by 1/sqrt(fan_in), biases or None."""
    rng = np.random.default_rng(case["seed"])
    n, l, c, s, cc, c_out = (case[key] for key in ("n", "l", "c", "s", "cc", "c_out"))
    inner = case["heads"] * case["d"]
    a = dict(x=rng.standard_normal((n, l, c)),
             context=rng.standard_normal((n, s, cc)) if case["cross"] else None,
             wq=rng.standard_normal((inner, c)) / math.sqrt(c), wk=rng.standard_normal((inner, cc)) / math.sqrt(cc),
             wv=rng.standard_normal((inner, cc)) / math.sqrt(cc),
             wo=rng.standard_normal((c_out, inner)) / math.sqrt(inner))
    for name, size, present in zip(("bq", "bk", "bv", "bo"), (inner, inner, inner, c_out), case["biases"]):
        a[name] = 0.5 * rng.standard_normal(size) if present else None
    a = {key: None if v is None else v.astype(dtype) for key, v in a.items()}
    return a, make_mask(rng, case["mask"], n, s)


def one_key_per_row(case):
    """True when every row attends to exactly one key: the softmax is then the constant 1."""
    return case["s"] == 1 or case["mask"] == "one"


def sdpa_zero_grads(case):
    """Names whose gradient is identically zero: with one key per row, o = v_kept ignores q and k."""
    return ("q", "k") if one_key_per_row(case) else ()


def mha_zero_grads(case):
    """Names whose gradient is identically zero for this case.

    bk: softmax is shift invariant and q.bk adds the same number to every score of a row.
    With one key per row the query and key paths drop out (x too, for cross-attention).
    """
    zero = ["bk"]
    if one_key_per_row(case):
        zero += ["wq", "bq", "wk"] + (["x"] if case["cross"] else [])
    return tuple(zero)


def mha_call(a, case, mask):
    return mha_forward(a["x"], a["wq"], a["bq"], a["wk"], a["bk"], a["wv"], a["bv"], a["wo"], a["bo"],
                       case["heads"], context=a["context"], mask=mask)


# Centered differences of L = sum(g * y) carry a roundoff floor of about eps * sum|g * y| / H (each
# y is computed to ~eps |y|), so a relative error below 1e-7 is only reachable for a gradient above
# RESOLVE * floor. Softmax cancellations make smaller ones common on tiny shapes (a single key
# weight with two nearly equal context values; the hypothesis-found @examples below failed with
# rel err 1.4e-7 and 4.3e-7 at absolute errors below one floor). Those are checked against the
# floor itself instead: |analytic - numeric| < FLOOR_MULT * floor (2400 random mha cases: at most
# 4.4 floors, 99th percentile 0.3). H = 1e-5 keeps the floor 10x below gradcheck's default 1e-6
# while the truncation error H^2 |d3L/dx3| / 6 stays below 1e-10 for these O(1) scores.
H = 1e-5
RESOLVE = 1e7
FLOOR_MULT = 30


def grad_check(forward, inputs, grads_fn, zero):
    """check_grads (rel err < 1e-7) on every gradient large enough to resolve; the rest to the
    finite-difference floor. Names in `zero` are identically zero by the math: assert that too."""
    seen = {}

    def backward_grads(g):
        seen.update(grads=grads_fn(g), g=g)
        seen["floor"] = np.finfo(np.float64).eps * float(np.sum(np.abs(g * forward(**inputs)))) / H
        seen["small"] = [k for k, v in seen["grads"].items() if np.abs(v).max() < RESOLVE * seen["floor"]]
        return {k: v for k, v in seen["grads"].items() if k not in seen["small"]}

    check_grads(forward, inputs, backward_grads, h=H)
    assert set(zero) <= set(seen["small"]), (zero, seen["small"])
    for name in zero:
        assert np.abs(seen["grads"][name]).max() < 1e-12, name
    for name in seen["small"]:
        idx, gn = numeric_grad(lambda: float(np.sum(seen["g"] * forward(**inputs))), inputs[name], h=H)
        err = np.abs(seen["grads"][name].reshape(-1)[idx] - gn).max()
        assert err < FLOOR_MULT * seen["floor"], f"{name}: abs err {err:.2e}, floor {seen['floor']:.2e}"


# ---------------------------------------------------------------- naive references


def sdpa_naive(q, k, v, mask):
    """Loops over (n, h, i): o_i = sum_j w_ij v_j / sum_j w_ij, w_ij = exp(q_i.k_j / sqrt(D)) or 0."""
    n, h, l, d = q.shape
    o = np.zeros((n, h, l, v.shape[3]))
    for b in range(n):
        for hh in range(h):
            for i in range(l):
                w = [0.0 if mask is not None and not mask[b, j] else
                     math.exp(float(q[b, hh, i] @ k[b, hh, j]) / math.sqrt(d)) for j in range(k.shape[2])]
                o[b, hh, i] = sum(wj * v[b, hh, j] for j, wj in enumerate(w)) / sum(w)
    return o


def mha_naive(a, heads, mask):
    """Per-head slices of the projections through sdpa_naive, then the output projection."""
    ctx = a["x"] if a["context"] is None else a["context"]
    q, k, v = a["x"] @ a["wq"].T, ctx @ a["wk"].T, ctx @ a["wv"].T
    q, k, v = (t if b is None else t + b for t, b in ((q, a["bq"]), (k, a["bk"]), (v, a["bv"])))
    d = q.shape[2] // heads
    out = np.concatenate([sdpa_naive(q[:, None, :, i * d:(i + 1) * d], k[:, None, :, i * d:(i + 1) * d],
                                     v[:, None, :, i * d:(i + 1) * d], mask)[:, 0] for i in range(heads)], axis=2)
    y = out @ a["wo"].T
    return y if a["bo"] is None else y + a["bo"]


# ---------------------------------------------------------------- sdpa


SDPA_EDGES = [
    dict(n=1, h=1, l=1, s=1, d=1, dv=1, mask="none", seed=0),  # smallest: one head, one key
    dict(n=2, h=3, l=2, s=4, d=3, dv=2, mask="random", seed=1),  # several heads, L != S, masked
    dict(n=1, h=2, l=4, s=1, d=2, dv=3, mask="none", seed=2),  # a single key (context length 1)
    dict(n=2, h=1, l=1, s=3, d=2, dv=1, mask="one", seed=3),  # L = 1, one kept key per row
    dict(n=1, h=1, l=3, s=3, d=1, dv=2, mask="random", seed=4),
]


def with_examples(cases):
    def deco(f):
        for c in reversed(cases):
            f = example(case=c)(f)
        return f
    return deco


@given(case=sdpa_cases())
@with_examples(SDPA_EDGES)
def test_sdpa_forward_matches_naive(case):
    a, mask = sdpa_arrays(case)
    o, _ = sdpa_forward(a["q"], a["k"], a["v"], mask)
    assert rel_error(o, sdpa_naive(a["q"], a["k"], a["v"], mask)) < 1e-12


@given(case=sdpa_cases())
@with_examples(SDPA_EDGES)
def test_sdpa_gradcheck(case):
    a, mask = sdpa_arrays(case)

    def grads(g):
        _, cache = sdpa_forward(a["q"], a["k"], a["v"], mask)
        return dict(zip("qkv", sdpa_backward(g, cache)))

    grad_check(lambda q, k, v: sdpa_forward(q, k, v, mask)[0], a, grads, sdpa_zero_grads(case))


def test_sdpa_masked_keys_get_zero_attention_and_zero_grad(rng):
    n, h, l, s, d = 2, 2, 3, 5, 2
    q, k = rng.standard_normal((n, h, l, d)), rng.standard_normal((n, h, s, d))
    mask = np.array([[True, False, True, False, False], [False, True, True, True, False]])
    eye = np.broadcast_to(np.eye(s), (n, h, s, s)).copy()  # v = one-hot keys, so o = p itself
    p, cache = sdpa_forward(q, k, eye, mask)
    assert np.all(p.transpose(0, 3, 1, 2)[~mask] == 0.0)  # exactly zero attention
    assert np.all(p.transpose(0, 3, 1, 2)[mask] > 0.0)
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-14)
    _, dk, dv = sdpa_backward(rng.standard_normal(p.shape), cache)
    assert np.all(dk.transpose(0, 2, 1, 3)[~mask] == 0.0) and np.all(dv.transpose(0, 2, 1, 3)[~mask] == 0.0)
    # whatever sits at a masked key (even huge values) leaves the output bit-identical
    v = rng.standard_normal((n, h, s, 3))
    o1, _ = sdpa_forward(q, k, v, mask)
    k2, v2 = k.copy(), v.copy()
    k2.transpose(0, 2, 1, 3)[~mask] = 1e6
    v2.transpose(0, 2, 1, 3)[~mask] = -1e6
    o2, _ = sdpa_forward(q, k2, v2, mask)
    assert np.array_equal(o1, o2)


def test_sdpa_stable_for_large_scores(rng):
    q, k, v = (rng.standard_normal((1, 1, 3, 2)) * 300 for _ in range(3))  # scores ~ 1e5: exp overflows
    o, cache = sdpa_forward(q, k, v)
    assert np.all(np.isfinite(o))
    dq, dk, dv = sdpa_backward(np.ones_like(o), cache)
    assert all(np.all(np.isfinite(t)) for t in (dq, dk, dv))
    p, _ = sdpa_forward(q, k, np.eye(3)[None, None])  # v = one-hot keys, so o = p itself
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=1e-14)


def test_sdpa_backward_does_not_mutate(rng):
    case = dict(n=2, h=2, l=3, s=4, d=2, dv=3, mask="random", seed=5)
    a, mask = sdpa_arrays(case)
    o, cache = sdpa_forward(a["q"], a["k"], a["v"], mask)
    do = rng.standard_normal(o.shape)
    do0, cache0 = do.copy(), copy.deepcopy(cache)
    first = sdpa_backward(do, cache)
    assert np.array_equal(do, do0) and tree_equal(cache, cache0)
    second = sdpa_backward(do, cache)  # same answer twice: nothing accumulated in place
    assert all(np.array_equal(x, y) for x, y in zip(first, second))


def test_sdpa_float32_stays_float32():
    case = dict(n=2, h=2, l=3, s=4, d=2, dv=3, mask="random", seed=6)
    a32, mask = sdpa_arrays(case, np.float32)
    a64, _ = sdpa_arrays(case)
    o32, c32 = sdpa_forward(a32["q"], a32["k"], a32["v"], mask)
    o64, c64 = sdpa_forward(a64["q"], a64["k"], a64["v"], mask)
    do = np.random.default_rng(0).standard_normal(o32.shape)
    g32 = sdpa_backward(do.astype(np.float32), c32)
    g64 = sdpa_backward(do, c64)
    assert o32.dtype == np.float32 and all(g.dtype == np.float32 for g in g32)
    assert rel_error(o32, o64) < 1e-5 and all(rel_error(x, y) < 1e-5 for x, y in zip(g32, g64))


# ---------------------------------------------------------------- mha


def mha_case(**kw):
    base = dict(n=1, l=1, c=2, heads=1, d=2, c_out=2, cross=False, s=1, cc=2, mask="none",
                biases=(False, False, False, False), seed=0)
    base.update(kw)
    if not base["cross"]:
        base["s"], base["cc"] = base["l"], base["c"]
    return base


MHA_EDGES = [
    mha_case(),  # one head, batch 1, L = 1, self-attention, every bias None
    mha_case(n=2, l=3, c=3, heads=3, d=2, c_out=4, cross=True, s=1, cc=2, biases=(True,) * 4, seed=1),  # context length 1
    mha_case(n=2, l=3, c=3, heads=2, d=1, c_out=3, cross=True, s=4, cc=1, mask="random",
             biases=(False, True, True, True), seed=2),  # L != S, Cc != C, masked
    mha_case(n=2, l=4, c=2, heads=2, d=2, c_out=2, mask="random", biases=(True, False, True, False), seed=3),
    mha_case(n=1, l=1, c=4, heads=1, d=1, c_out=1, cross=True, s=3, cc=2, mask="one", seed=4),  # L = 1
    mha_case(n=1, l=3, c=2, heads=3, d=1, c_out=2, mask="one", biases=(True,) * 4, seed=5),
    # found by hypothesis: the kept key's x is 8e-4, so dwv ~4e-6 (rel err 4.3e-7 at h = 1e-6)
    mha_case(n=1, l=2, c=1, heads=1, d=1, c_out=1, mask="one", biases=(False, False, False, True), seed=46283),
    # found by hypothesis: dwk ~5e-6 from two nearly equal context values (rel err 1.4e-7 at h = 1e-5)
    mha_case(n=1, l=2, c=3, heads=1, d=1, c_out=4, cross=True, s=2, cc=1, biases=(False, False, True, True),
             seed=10000),
]


@given(case=mha_cases())
@with_examples(MHA_EDGES)
def test_mha_forward_matches_naive(case):
    a, mask = mha_arrays(case)
    y, _ = mha_call(a, case, mask)
    assert y.shape == (case["n"], case["l"], case["c_out"])
    assert rel_error(y, mha_naive(a, case["heads"], mask)) < 1e-12


@given(case=mha_cases())
@with_examples(MHA_EDGES)
def test_mha_gradcheck(case):
    a, mask = mha_arrays(case)
    inputs = {key: v for key, v in a.items() if v is not None}

    def forward(**kw):
        return mha_call({name: kw.get(name) for name in MHA_NAMES}, case, mask)[0]

    def grads(g):
        _, cache = mha_call(a, case, mask)
        out = dict(zip(MHA_NAMES, mha_backward(g, cache)))
        assert (out["context"] is None) == (not case["cross"])  # self-attention: no dcontext
        for name in ("bq", "bk", "bv", "bo"):
            assert (out[name] is None) == (a[name] is None)
        return {key: v for key, v in out.items() if v is not None}

    zero = tuple(name for name in mha_zero_grads(case) if name in inputs)
    grad_check(forward, inputs, grads, zero)


def test_mha_masked_keys_get_zero_dcontext(rng):
    case = mha_case(n=2, l=3, c=3, heads=2, d=2, c_out=3, cross=True, s=5, cc=2, mask="random",
                    biases=(True,) * 4, seed=7)
    a, mask = mha_arrays(case)
    y, cache = mha_call(a, case, mask)
    dcontext = mha_backward(rng.standard_normal(y.shape), cache)[1]
    assert np.all(dcontext[~mask] == 0.0) and np.all(dcontext[mask] != 0.0)


def test_mha_backward_does_not_mutate(rng):
    for cross in (False, True):
        case = mha_case(n=2, l=3, c=3, heads=2, d=2, c_out=3, cross=cross, s=2, cc=4, mask="random",
                        biases=(True,) * 4, seed=8)
        a, mask = mha_arrays(case)
        y, cache = mha_call(a, case, mask)
        dy = rng.standard_normal(y.shape)
        dy0, cache0 = dy.copy(), copy.deepcopy(cache)
        first = mha_backward(dy, cache)
        assert np.array_equal(dy, dy0) and tree_equal(cache, cache0)
        assert tree_equal(first, mha_backward(dy, cache))


def test_mha_float32_stays_float32(rng):
    for cross in (False, True):
        case = mha_case(n=2, l=3, c=3, heads=2, d=2, c_out=3, cross=cross, s=2, cc=4, mask="random",
                        biases=(True,) * 4, seed=9)
        a32, mask = mha_arrays(case, np.float32)
        a64, _ = mha_arrays(case)
        y32, c32 = mha_call(a32, case, mask)
        y64, c64 = mha_call(a64, case, mask)
        dy = rng.standard_normal(y32.shape)
        g32, g64 = mha_backward(dy.astype(np.float32), c32), mha_backward(dy, c64)
        assert y32.dtype == np.float32 and rel_error(y32, y64) < 1e-5
        for name, x, y in zip(MHA_NAMES, g32, g64):
            assert (x is None) == (y is None), name
            if x is not None and name != "bk":  # dbk is zero up to rounding
                assert x.dtype == np.float32 and rel_error(x, y) < 1e-5, name


def tree_equal(a, b):
    """Equality of nested tuples of arrays / scalars / None, arrays compared exactly."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(tree_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


# ---------------------------------------------------------------- torch float64 autograd


def close(ours, theirs, tol=1e-10):
    """rel err < tol, or both below 1e-12 where the gradient is zero by the math (e.g. dbk)."""
    theirs = theirs.detach().numpy()
    both_zero = max(np.abs(ours).max(initial=0), np.abs(theirs).max(initial=0)) < 1e-12
    return both_zero or rel_error(ours, theirs) < tol


@needs("torch")
@given(case=sdpa_cases())
@with_examples(SDPA_EDGES)
def test_sdpa_matches_torch(case):
    torch = pytest.importorskip("torch")
    a, mask = sdpa_arrays(case)
    t = {key: torch.tensor(v, requires_grad=True) for key, v in a.items()}
    attn_mask = None if mask is None else torch.tensor(mask)[:, None, None, :]
    o_t = torch.nn.functional.scaled_dot_product_attention(t["q"], t["k"], t["v"], attn_mask=attn_mask)
    g = np.random.default_rng(case["seed"] + 1).standard_normal(o_t.shape)
    (o_t * torch.tensor(g)).sum().backward()
    o, cache = sdpa_forward(a["q"], a["k"], a["v"], mask)
    assert rel_error(o, o_t.detach().numpy()) < 1e-10
    for name, ours in zip("qkv", sdpa_backward(g, cache)):
        assert close(ours, t[name].grad), name


def torch_mha(torch, t, heads, mask):
    """Explicit torch composition of multi-head attention (t: dict of tensors or None)."""
    ctx = t["x"] if t["context"] is None else t["context"]

    def proj(inp, w, b):
        y = inp @ w.T
        return y if b is None else y + b

    def split(u):
        return u.reshape(u.shape[0], u.shape[1], heads, -1).transpose(1, 2)  # (N, h, T, D)

    q, k, v = split(proj(t["x"], t["wq"], t["bq"])), split(proj(ctx, t["wk"], t["bk"])), split(proj(ctx, t["wv"], t["bv"]))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        s = s.masked_fill(~torch.tensor(mask)[:, None, None, :], float("-inf"))
    o = (s.softmax(-1) @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    return proj(o, t["wo"], t["bo"])


@needs("torch")
@given(case=mha_cases())
@with_examples(MHA_EDGES)
def test_mha_matches_torch(case):
    torch = pytest.importorskip("torch")
    a, mask = mha_arrays(case)
    t = {key: None if v is None else torch.tensor(v, requires_grad=True) for key, v in a.items()}
    y_t = torch_mha(torch, t, case["heads"], mask)
    g = np.random.default_rng(case["seed"] + 1).standard_normal(y_t.shape)
    (y_t * torch.tensor(g)).sum().backward()
    y, cache = mha_call(a, case, mask)
    assert rel_error(y, y_t.detach().numpy()) < 1e-10
    for name, ours in zip(MHA_NAMES, mha_backward(g, cache)):
        assert (ours is None) == (t[name] is None or (name == "context" and not case["cross"])), name
        if ours is not None:
            assert close(ours, t[name].grad), name


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_the_argument(rng):
    q, k, v = rng.standard_normal((2, 2, 3, 4)), rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 2, 5, 4))
    with pytest.raises(ValueError, match="^q must be a floating-point"):
        sdpa_forward(q.astype(np.int64), k, v)
    with pytest.raises(ValueError, match="^k must have shape"):
        sdpa_forward(q, k[..., :3], v)
    with pytest.raises(ValueError, match="^mask must have shape"):
        sdpa_forward(q, k, v, mask=np.ones((2, 4), bool))
    with pytest.raises(ValueError, match="^mask must be a boolean"):
        sdpa_forward(q, k, v, mask=np.ones((2, 5), np.int64))
    all_masked = np.ones((2, 5), bool)
    all_masked[1] = False
    with pytest.raises(ValueError, match=r"^mask must keep at least one key in every row; rows \[1\]"):
        sdpa_forward(q, k, v, mask=all_masked)

    x, ctx = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 6))
    w = dict(wq=rng.standard_normal((6, 4)), wk=rng.standard_normal((6, 6)), wv=rng.standard_normal((6, 6)),
             wo=rng.standard_normal((4, 6)))

    def call(x=x, heads=2, context=ctx, mask=None, **kw):
        p = {**w, **kw}
        return mha_forward(x, p["wq"], None, p["wk"], None, p["wv"], None, p["wo"], None, heads,
                           context=context, mask=mask)

    call()  # the valid call these variations break
    with pytest.raises(ValueError, match="^heads must divide the inner dim 6"):
        call(heads=4)
    with pytest.raises(ValueError, match="^heads must be a positive int"):
        call(heads=0)
    with pytest.raises(ValueError, match="^x must be a floating-point"):
        call(x=x.astype(np.int32))
    with pytest.raises(ValueError, match="^wq must be a floating-point"):
        call(wq=w["wq"].astype(np.int64))
    with pytest.raises(ValueError, match="^wk must have shape"):
        call(context=ctx[..., :5])
    with pytest.raises(ValueError, match="^mask must have shape"):
        call(mask=np.ones((2, 3), bool))  # (N, L) given for a context of S = 5 keys
    with pytest.raises(ValueError, match="^mask must keep at least one key"):
        call(mask=np.zeros((2, 5), bool))
    with pytest.raises(ValueError, match="^context must hold at least one token"):
        call(context=ctx[:, :0])


# ---------------------------------------------------------------- NumPy vs CuPy


@pytest.mark.gpu
def test_numpy_and_cupy_agree():
    pytest.importorskip("cupy")
    from minidiff.backend import gpu_available, to_device

    if not gpu_available():
        pytest.skip("CuPy is installed but no CUDA GPU is visible")
    case = mha_case(n=2, l=3, c=3, heads=2, d=2, c_out=3, cross=True, s=4, cc=2, mask="random",
                    biases=(True,) * 4, seed=11)
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 1e-5)):
        a, mask = mha_arrays(case, dtype)
        y, cache = mha_call(a, case, mask)
        dy = np.random.default_rng(0).standard_normal(y.shape).astype(dtype)
        a_gpu = {key: None if v is None else to_device(v, "gpu") for key, v in a.items()}
        y_gpu, cache_gpu = mha_call(a_gpu, case, to_device(mask, "gpu"))
        assert y_gpu.dtype == dtype and rel_error(y_gpu, y) < tol
        for name, g, g_gpu in zip(MHA_NAMES, mha_backward(dy, cache), mha_backward(to_device(dy, "gpu"), cache_gpu)):
            if g is not None and name != "bk":  # dbk is zero up to rounding
                assert g_gpu.dtype == dtype and rel_error(g_gpu, g) < tol, name
    with pytest.raises(ValueError, match="^mask must keep at least one key"):  # validated on the host
        mha_call(a_gpu, case, to_device(np.zeros((2, 4), bool), "gpu"))
