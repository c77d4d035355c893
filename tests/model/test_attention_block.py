"""The U-Net's attention block (minidiff/model/attention_block.py) on its own: centered finite
differences in float64 for every parameter, x and the prompt context, with and without
cross-attention; the same block written in plain torch ops and differentiated by autograd
(where torch imports); and a backward that leaves dy and its cache untouched.

Tolerances: finite differences 1e-7 relative (h = 1e-6; GroupNorm, four linears and a softmax, a
loss of O(10): the differences carry ~1e-10 absolute noise against gradients of >= ~1e-3). Against
torch autograd 1e-10 (the same formulas in float64; rounding differs only in summation order).
The self-attention key bias has a zero gradient (softmax ignores a shift shared by all keys): both
sides hold rounding noise there, which check_grads's floor (the differences' own rounding) absorbs.

Shape legend: N batch, C channels, H W spatial, S prompt tokens, Cd their width, h heads.
"""

import dataclasses

import numpy as np
import pytest
from gradcheck import check_grads, needs, rel_error
from purity import assert_same, snapshot

from minidiff.model.attention_block import attention_block_backward, attention_block_forward
from minidiff.model.config import get_preset
from minidiff.model.params import init_params

TINY = get_preset("tiny")  # down_blocks.1.attentions.0: C = 16, 4 groups, attention_head_dim 8 (2 heads)
CROSS = dataclasses.replace(TINY, cross_attention_dim=6, context_vocab_size=7)
PREFIX = "down_blocks.1.attentions.0."
N, C, S = 2, 16, 3

CASES = [  # (config, heads, rescale_output_factor, with a context)
    (TINY, 2, 1.0, False),  # self-attention, 2 heads
    (TINY, 1, 2.0, False),  # one head, the mid block's rescale
    (CROSS, 2, 1.0, True),  # added key/value cross-attention to a prompt with padding
]


def _setup(config, with_context, seed=0):
    p = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    params = {k: v + 0.2 * rng.standard_normal(v.shape) if "group_norm" in k else v
              for k, v in p.items() if k.startswith(PREFIX)}
    arrays = {"x": rng.standard_normal((N, C, 4, 4))}
    mask = None
    if with_context:
        arrays["context"] = rng.standard_normal((N, S, config.cross_attention_dim))
        mask = np.ones((N, S), bool)
        mask[1, 1:] = False  # sample 1 has one real token, then padding
    return params, arrays, mask


def _forward(params, arrays, mask, config, heads, rescale):
    return attention_block_forward(params, PREFIX, arrays["x"], heads, config.norm_num_groups, config.norm_eps,
                                   arrays.get("context"), mask, rescale)


@pytest.mark.parametrize("config, heads, rescale, with_context", CASES)
def test_attention_block_gradcheck(config, heads, rescale, with_context):
    params, arrays, mask = _setup(config, with_context)
    assert any("add_k_proj" in k for k in params) == with_context

    def forward(**inputs):
        return _forward({k: inputs[k] for k in params}, {k: inputs[k] for k in arrays}, mask, config, heads,
                        rescale)[0]

    def analytic(g):
        _, cache = _forward(params, arrays, mask, config, heads, rescale)
        before = snapshot((g, cache))
        grads = {}
        dx, dctx = attention_block_backward(g, cache, grads)
        assert_same(snapshot((g, cache)), before)  # the backward mutated neither dy nor its cache
        assert grads.keys() == params.keys() and (dctx is None) == (not with_context)
        return {**grads, "x": dx, **({"context": dctx} if with_context else {})}

    check_grads(forward, {**params, **arrays}, analytic, max_coords=16)


def _torch_block(torch, p, x, heads, groups, eps, context, mask, rescale):
    """The block in plain torch ops: GroupNorm, tokens, q k v (context keys/values first), softmax, to_out."""
    F = torch.nn.functional
    n, c, hh, ww = x.shape
    hn = F.group_norm(x, groups, p["group_norm.weight"], p["group_norm.bias"], eps)
    tokens = hn.reshape(n, c, -1).transpose(1, 2)  # (N, L, C)
    q, k, v = (F.linear(tokens, p[f"{name}.weight"], p[f"{name}.bias"]) for name in ("to_q", "to_k", "to_v"))
    keep = torch.ones(n, k.shape[1], dtype=torch.bool)
    if context is not None:
        k = torch.cat([F.linear(context, p["add_k_proj.weight"], p["add_k_proj.bias"]), k], dim=1)
        v = torch.cat([F.linear(context, p["add_v_proj.weight"], p["add_v_proj.bias"]), v], dim=1)
        keep = torch.cat([torch.from_numpy(mask), keep], dim=1)

    def split(t):
        return t.reshape(n, t.shape[1], heads, c // heads).transpose(1, 2)  # (N, h, T, D)

    scores = split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    o = (torch.softmax(scores, dim=-1) @ split(v)).transpose(1, 2).reshape(n, -1, c)
    out = F.linear(o, p["to_out.0.weight"], p["to_out.0.bias"]).transpose(1, 2).reshape(n, c, hh, ww)
    return (out + x) / rescale


@needs("torch")
@pytest.mark.parametrize("config, heads, rescale, with_context", CASES)
def test_attention_block_matches_torch_autograd(config, heads, rescale, with_context):
    import torch

    params, arrays, mask = _setup(config, with_context)
    y, cache = _forward(params, arrays, mask, config, heads, rescale)
    dy = np.random.default_rng(7).standard_normal(y.shape)
    grads = {}
    dx, dctx = attention_block_backward(dy, cache, grads)
    tp = {k[len(PREFIX):]: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tx = {k: torch.tensor(v, requires_grad=True) for k, v in arrays.items()}
    ty = _torch_block(torch, tp, tx["x"], heads, config.norm_num_groups, config.norm_eps, tx.get("context"), mask,
                      rescale)
    ty.backward(torch.tensor(dy))
    assert rel_error(y, ty.detach().numpy()) < 1e-10
    assert rel_error(dx, tx["x"].grad.numpy()) < 1e-10
    if with_context:
        assert rel_error(dctx, tx["context"].grad.numpy()) < 1e-10
    for k, g in grads.items():
        ref = tp[k[len(PREFIX):]].grad.numpy()
        if k.endswith("to_k.bias") and not with_context:  # zero by symmetry: rounding noise on both sides
            assert np.abs(g).max() < 1e-12 and np.abs(ref).max() < 1e-12, k
        else:
            assert rel_error(g, ref) < 1e-10, (k, rel_error(g, ref))
