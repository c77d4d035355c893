"""The U-Net: whole-network float64 gradient checks, re-entrancy, cross-attention semantics,
dropout, initialization, parameter counts and config validation (NumPy only; the diffusers
cross-checks are in test_unet_diffusers.py, the blocks' own gradchecks in test_blocks.py and
test_attention_block.py).

Tolerance of the whole-network gradient check: 1e-6 relative, with h = 1e-5. The loss
L = sum(g * eps) (|L| ~ 10) passes through ~100 ops, so its rounding noise is ~1e-14 and the
centered difference carries ~1e-9 absolute noise; the smallest gradients sampled are ~1e-2,
which puts the floor near 1e-7 (measured: <= 8e-8). A wrong backward gives errors of order 1.
"""

import dataclasses
import io

import numpy as np
import pytest
from gradcheck import check_network_grads, rel_error

from minidiff.backend import gpu_available, to_device, to_numpy
from minidiff.model.unet import count_params, init_params, param_shapes, print_param_counts, unet_backward, unet_forward
from minidiff.model.config import PRESETS, UNetConfig, from_diffusers_config, get_preset

TINY = get_preset("tiny")
CLASS = dataclasses.replace(TINY, num_class_embeds=3, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
                            mid_block_scale_factor=2.0, attention_head_dim=None)
CROSS = dataclasses.replace(TINY, cross_attention_dim=6, context_vocab_size=7)
H, TOL = 1e-5, 1e-6


def _params(config, seed=0):
    """float64 params with GroupNorm scales/shifts moved off 1/0, so their gradients are generic."""
    p = init_params(config, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for k, v in p.items():
        if v.ndim == 1 and "norm" in k:
            p[k] = v + 0.2 * rng.standard_normal(v.shape)
    return p


def _inputs(config, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, config.in_channels, 8, 8))
    kw = {}
    if config.num_class_embeds:
        kw["class_labels"] = np.array([2, 0])
    if config.cross_attention_dim:
        kw["context"] = np.array([[3, 1, 0], [6, 0, 0]])  # trailing padding in both rows
    return x, np.array([5, 900]), kw


def _zero_by_symmetry(config, key):
    """Self-attention is invariant to the key bias (softmax ignores a per-query shift)."""
    return key.endswith("to_k.bias") and config.cross_attention_dim is None


def _gradcheck(config, coords, train=False):
    p, (x, t, kw) = _params(config), _inputs(config)
    kw = dict(kw, train=train, rng=7)  # rng=7: the same dropout masks on every call
    eps, cache = unet_forward(p, config, x, t, **kw)
    g = np.random.default_rng(2).standard_normal(eps.shape)
    grads, dx = unet_backward(g, cache)
    # (the directional check's measured error is ~1e-10, so the smooth-op tolerance 1e-7 holds there)
    check_network_grads(lambda q, xx: unet_forward(q, config, xx, t, **kw)[0], p, x, g, grads, dx, coords, H, TOL,
                        zero_key=lambda key: _zero_by_symmetry(config, key))


def test_gradcheck_unconditional():
    _gradcheck(TINY, coords=2)


def test_gradcheck_class_conditional_padding0_one_head_mid_scale():
    _gradcheck(CLASS, coords=1)


def test_gradcheck_cross_attention():
    _gradcheck(CROSS, coords=1)


def test_gradcheck_dropout_train():
    _gradcheck(dataclasses.replace(TINY, dropout=0.3), coords=0, train=True)


def test_reentrant_two_forwards_then_two_backwards():
    """CFG calls the model twice per step: each cache must stay valid on its own."""
    p, (x, t, kw) = _params(CROSS), _inputs(CROSS)
    x2 = np.random.default_rng(9).standard_normal(x.shape)
    ctx2 = np.zeros_like(kw["context"])
    g = np.random.default_rng(2).standard_normal(x.shape)
    e1, c1 = unet_forward(p, CROSS, x, t, context=kw["context"])
    e2, c2 = unet_forward(p, CROSS, x2, t, context=ctx2)
    g2, dx2 = unet_backward(g, c2)
    g1, dx1 = unet_backward(g, c1)
    g1_again, dx1_again = unet_backward(g, c1)  # a backward leaves its cache untouched
    ref_e1, ref_c1 = unet_forward(p, CROSS, x, t, context=kw["context"])
    ref_g1, ref_dx1 = unet_backward(g, ref_c1)
    ref_e2, ref_c2 = unet_forward(p, CROSS, x2, t, context=ctx2)
    ref_g2, ref_dx2 = unet_backward(g, ref_c2)
    np.testing.assert_array_equal(e1, ref_e1)
    np.testing.assert_array_equal(e2, ref_e2)
    for a, b in ((dx1, ref_dx1), (dx1_again, ref_dx1), (dx2, ref_dx2)):
        np.testing.assert_array_equal(a, b)
    for k in p:
        np.testing.assert_array_equal(g1[k], ref_g1[k])
        np.testing.assert_array_equal(g1_again[k], ref_g1[k])
        np.testing.assert_array_equal(g2[k], ref_g2[k])


def test_empty_prompt_is_plain_self_attention():
    """All-padding context == context None == the same net without cross-attention parameters."""
    p, (x, t, _) = _params(CROSS), _inputs(CROSS)
    plain = {k: v for k, v in p.items() if "add_" not in k and "context_embedding" not in k}
    ref, _ = unet_forward(plain, TINY, x, t)
    empty, cache = unet_forward(p, CROSS, x, t, context=np.zeros((2, 4), np.int64))
    none, _ = unet_forward(p, CROSS, x, t)
    np.testing.assert_allclose(empty, ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(none, ref, rtol=0, atol=1e-13)
    grads, _ = unet_backward(np.ones_like(empty), cache)
    for k in p:  # nothing reaches the prompt path when every token is padding
        if "add_" in k or "context_embedding" in k:
            assert not grads[k].any(), k


def test_padding_tokens_are_ignored_and_real_tokens_matter():
    p, (x, t, _) = _params(CROSS), _inputs(CROSS)
    short, _ = unet_forward(p, CROSS, x, t, context=np.array([[3, 1], [6, 2]]))
    padded, cache = unet_forward(p, CROSS, x, t, context=np.array([[3, 1, 0, 0], [6, 2, 0, 0]]))
    other, _ = unet_forward(p, CROSS, x, t, context=np.array([[4, 1], [6, 2]]))
    np.testing.assert_allclose(padded, short, rtol=0, atol=1e-13)
    assert np.abs(other[0] - short[0]).max() > 1e-4  # a different token changes sample 0 ...
    np.testing.assert_allclose(other[1], short[1], rtol=0, atol=1e-13)  # ... and only sample 0
    grads, _ = unet_backward(np.ones_like(padded), cache)
    assert not grads["context_embedding.weight"][0].any()  # the padding row gets no gradient
    assert not grads["context_embedding.weight"][5].any()  # an unused token neither


def test_dropout_masks_follow_rng_and_eval_is_deterministic():
    config = dataclasses.replace(TINY, dropout=0.5)
    p, (x, t, _) = _params(config), _inputs(config)
    e_eval, _ = unet_forward(p, config, x, t)
    a, _ = unet_forward(p, config, x, t, train=True, rng=3)
    b, _ = unet_forward(p, config, x, t, train=True, rng=np.random.default_rng(3))
    c, _ = unet_forward(p, config, x, t, train=True, rng=4)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - e_eval).max() > 1e-3
    off, _ = unet_forward(p, TINY, x, t, train=True, rng=3)  # dropout 0: train == eval
    np.testing.assert_array_equal(off, e_eval)


def test_float32_forward_backward_keep_dtype():
    p = init_params(TINY, seed=0)
    x, t, _ = _inputs(TINY)
    eps, cache = unet_forward(p, TINY, x.astype(np.float32), 10)  # a scalar t broadcasts
    grads, dx = unet_backward(np.ones_like(eps), cache)
    assert eps.dtype == dx.dtype == np.float32 and all(v.dtype == np.float32 for v in grads.values())
    eps64, _ = unet_forward({k: v.astype(np.float64) for k, v in p.items()}, TINY, x, np.array([10, 10]))
    np.testing.assert_allclose(eps, eps64, rtol=0, atol=1e-4)


def test_init_params_pytorch_defaults_and_ddpm_zero_init():
    p32, p64 = init_params(CROSS, seed=5), init_params(CROSS, seed=5, dtype=np.float64)
    assert list(p32) == list(param_shapes(CROSS))
    for k in p32:
        np.testing.assert_array_equal(p32[k], p64[k].astype(np.float32))
    w = p64["down_blocks.1.resnets.0.conv1.weight"]  # fan_in = 8 * 3 * 3
    assert np.abs(w).max() <= 1 / np.sqrt(72) and np.abs(w).max() > 0.9 / np.sqrt(72)
    b = p64["time_embedding.linear_2.bias"]  # fan_in = 32
    assert np.abs(b).max() <= 1 / np.sqrt(32) and b.std() > 0.1
    assert (p64["mid_block.resnets.0.norm1.weight"] == 1).all() and (p64["conv_norm_out.bias"] == 0).all()
    emb = p64["context_embedding.weight"]
    assert abs(emb.std() - 1) < 0.35 and np.abs(emb).max() > 1.2  # N(0, 1), not the uniform bound
    z = init_params(CROSS, seed=5, dtype=np.float64, zero_init_last=True)
    zeroed = [k for k in z if not z[k].any()]
    assert "conv_out.weight" in zeroed and "mid_block.resnets.1.conv2.bias" in zeroed
    assert "up_blocks.0.attentions.1.to_out.0.weight" in zeroed
    for k in z:
        if k not in zeroed:
            np.testing.assert_array_equal(z[k], p64[k])  # the draws themselves are unchanged
    assert not any(k.endswith("conv1.weight") for k in zeroed)
    assert not (init_params(CROSS, seed=6)["conv_in.weight"] == p32["conv_in.weight"]).all()


def _expected_param_count(c):
    """UNet2DModel's parameters summed layer by layer from the config alone (not from params.py):
    a k x k conv has C_out C_in k^2 + C_out, a linear out in + out, a GroupNorm 2 C, an embedding V width;
    the up path's resnets read concat(h, skip), the skips popped in reverse from the down path's stack."""
    def conv(cin, cout, k=3):
        return cout * cin * k * k + cout

    def linear(fin, fout):
        return fout * fin + fout

    def resnet(cin, cout):
        shortcut = conv(cin, cout, k=1) if cin != cout else 0
        return 2 * cin + conv(cin, cout) + linear(T, cout) + 2 * cout + conv(cout, cout) + shortcut

    def attention(ch, attn):
        return (2 * ch + 4 * linear(ch, ch) + (2 * linear(cd, ch) if cd else 0)) if attn else 0

    boc, T, cd, layers = c.block_out_channels, c.temb_dim, c.cross_attention_dim, c.layers_per_block
    n = len(boc)
    total = conv(c.in_channels, boc[0]) + linear(boc[0], T) + linear(T, T)  # conv_in, time MLP
    total += (c.num_class_embeds or 0) * T + ((c.context_vocab_size or 0) * cd if cd else 0)  # embeddings
    h, skips = boc[0], [boc[0]]  # channels of h, and of each skip pushed so far
    for i, kind in enumerate(c.down_block_types):
        for _ in range(layers):
            total += resnet(h, boc[i]) + attention(boc[i], kind == "AttnDownBlock2D")
            h = boc[i]
            skips.append(h)
        if i < n - 1:
            total += conv(h, h)  # downsampler
            skips.append(h)
    total += 2 * resnet(h, h) + attention(h, c.add_attention)  # mid block
    for i, kind in enumerate(c.up_block_types):
        cout = boc[n - 1 - i]
        for _ in range(layers + 1):
            total += resnet(h + skips.pop(), cout) + attention(cout, kind == "AttnUpBlock2D")
            h = cout
        if i < n - 1:
            total += conv(h, h)  # upsampler
    return total + 2 * h + conv(h, c.out_channels)  # conv_norm_out, conv_out


def test_param_counts_of_presets():
    for c in (*PRESETS.values(), CLASS, CROSS):
        assert count_params(c) == _expected_param_count(c)
        assert count_params(init_params(c)) == count_params(c)
    assert round(count_params(PRESETS["ddpm-cifar10"]) / 1e6, 1) == 35.7  # Ho et al. 2020, appendix B: 35.7M
    out = io.StringIO()
    print_param_counts(file=out)
    assert f"{count_params(PRESETS['ddpm-cifar10']):,}" in out.getvalue() and "tiny" in out.getvalue()


def test_config_dict_roundtrip():
    for c in (*PRESETS.values(), CLASS, CROSS):
        assert UNetConfig.from_dict(c.to_dict()) == c
        assert UNetConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("changes, field", [
    (dict(norm_num_groups=3), "norm_num_groups"),
    (dict(sample_size=9), "sample_size"),
    (dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D")), "down_block_types"),
    (dict(up_block_types=("UpBlock2D",)), "up_block_types"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(downsample_padding=2), "downsample_padding"),
    (dict(dropout=1.0), "dropout"),
    (dict(cross_attention_dim=8), "context_vocab_size"),
    (dict(time_embedding_type="fourier"), "time_embedding_type"),
    (dict(block_out_channels=(8, 0)), "block_out_channels"),
    (dict(layers_per_block=0), "layers_per_block"),
    (dict(freq_shift=4), "freq_shift"),  # = block_out_channels[0] // 2: found by hypothesis (0/0 frequencies)
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(TINY, **changes)


def test_bad_config_dicts_name_the_field():
    with pytest.raises(ValueError, match="hidden_size"):
        UNetConfig.from_dict({"hidden_size": 3})
    good = {"sample_size": 8, "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "UpBlock2D"]}
    assert from_diffusers_config(good).block_out_channels == (8, 16)
    for key, value in [("resnet_time_scale_shift", "scale_shift"), ("mid_block_type", None),
                       ("class_embed_type", "timestep"), ("cross_attention_dim", 8), ("act_fn", "gelu"),
                       ("attn_norm_num_groups", 2), ("sample_size", [8, 16]), ("upsample_type", "resnet")]:
        with pytest.raises(ValueError, match=key):
            from_diffusers_config(dict(good, **{key: value}))


def test_bad_inputs_name_the_argument():
    p, (x, t, kw) = _params(CLASS), _inputs(CLASS)
    with pytest.raises(ValueError, match="class_labels"):
        unet_forward(p, CLASS, x, t)
    with pytest.raises(ValueError, match="class_labels"):
        unet_forward(p, CLASS, x, t, class_labels=np.array([3, 0]))
    with pytest.raises(ValueError, match="class_labels"):
        unet_forward(p, CLASS, x, t, class_labels=np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="context"):
        unet_forward(p, CLASS, x, t, context=np.ones((2, 3), np.int64), **kw)
    with pytest.raises(ValueError, match="x"):
        unet_forward(p, CLASS, x[:, :2], t, **kw)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet_forward(p, CLASS, x[:, :, :7, :7], t, **kw)
    with pytest.raises(ValueError, match="t"):
        unet_forward(p, CLASS, x, np.array([1, 2, 3]), **kw)
    with pytest.raises(ValueError, match="params"):
        unet_forward({k: v for k, v in p.items() if k != "conv_in.bias"}, CLASS, x, t, **kw)
    with pytest.raises(ValueError, match="dtype"):
        unet_forward(p, CLASS, x.astype(np.float32), t, **kw)
    with pytest.raises(ValueError, match="rng"):
        unet_forward(p, dataclasses.replace(CLASS, dropout=0.1), x, t, train=True, rng="seed", **kw)
    p_cross = _params(CROSS)
    with pytest.raises(ValueError, match="context"):
        unet_forward(p_cross, CROSS, x, t, context=np.array([[7, 0], [1, 2]]))
    with pytest.raises(ValueError, match="context"):
        unet_forward(p_cross, CROSS, x, t, context=np.array([1, 2]))
    eps_list, _ = unet_forward(p_cross, CROSS, x, 3, context=[[1, 2], [3, 0]])  # lists are accepted
    eps_arr, _ = unet_forward(p_cross, CROSS, x, np.array([3, 3]), context=np.array([[1, 2], [3, 0]]))
    np.testing.assert_array_equal(eps_list, eps_arr)


@pytest.mark.gpu
def test_cupy_matches_numpy():
    pytest.importorskip("cupy")
    if not gpu_available():
        pytest.skip("no CUDA GPU")
    p, (x, t, kw) = _params(CROSS), _inputs(CROSS)
    kw["class_labels"] = None
    config = dataclasses.replace(CROSS, dropout=0.2)
    eps, cache = unet_forward(p, config, x, t, context=kw["context"], train=True, rng=5)
    grads, dx = unet_backward(np.ones_like(eps), cache)
    gp = to_device(p, "gpu")
    eps_g, cache_g = unet_forward(gp, config, to_device(x, "gpu"), to_device(t, "gpu"),
                                  context=to_device(kw["context"], "gpu"), train=True, rng=5)
    grads_g, dx_g = unet_backward(to_device(np.ones_like(eps), "gpu"), cache_g)
    assert rel_error(to_numpy(eps_g), eps) < 1e-10 and rel_error(to_numpy(dx_g), dx) < 1e-10
    for k in grads:  # same dropout masks (drawn on the host), same float64 math up to summation order
        assert np.abs(to_numpy(grads_g[k]) - grads[k]).max() <= 1e-10 * max(np.abs(grads[k]).max(), 1e-3), k
