"""The guidance classifier's math: the classifier's hand-written backward (every parameter and the input,
against finite differences and diffusers' own blocks), and its input gradient grad_x log p(y | x_t).
Training and guidance are in test_classifier_train.py; the softmax cross-entropy it trains with is in
tests/nn/test_cross_entropy.py.

Tolerances. The whole classifier against finite differences (h = 1e-5): 1e-7. Its loss sum(g * logits)
is O(1) and passes through ~60 ops, so the centered difference carries ~1e-10 absolute noise against
sampled gradients of >= ~4e-4: measured worst 8e-9 (down_blocks.1.attentions.0.to_k.weight); a wrong
backward gives errors of order 1.
"""

import dataclasses
import math

import numpy as np
import pytest
from gradcheck import check_network_grads, numeric_grad, rel_error

from minidiff.model.classifier import (classifier_backward, classifier_forward, classifier_init_params,
                                 classifier_param_shapes, log_prob_grad)
from minidiff.nn.cross_entropy import log_softmax
from minidiff.model.unet import init_params
from minidiff.model.config import get_preset

TINY = get_preset("tiny")  # 8x8, levels (8, 16), attention in down_blocks.1 and the mid block
# the other code paths: padding-0 downsampling, [sin, cos], one head, no mid attention, dropout
VARIANT = dataclasses.replace(TINY, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, attention_head_dim=None,
                              mid_block_scale_factor=2.0, add_attention=False, dropout=0.3)
H, TOL, K = 1e-5, 1e-7, 3


@pytest.fixture
def torch1():
    """torch with one thread: these tensors are tiny, and a second thread only fights for a busy core."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- the classifier


def _params(config, seed=0):
    """float64 params with GroupNorm scales/shifts moved off 1/0, so their gradients are generic."""
    p = classifier_init_params(config, K, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed + 100)
    for k, v in p.items():
        if v.ndim == 1 and "norm" in k:
            p[k] = v + 0.2 * rng.standard_normal(v.shape)
    return p


def _inputs(seed=1):
    return np.random.default_rng(seed).standard_normal((2, 3, 8, 8)), np.array([5, 900])


def _gradcheck(config, coords, train=False):
    p, (x, t) = _params(config), _inputs()
    kw = dict(train=train, rng=7)  # rng=7: the same dropout masks on every call
    logits, cache = classifier_forward(p, config, x, t, **kw)
    g = np.random.default_rng(2).standard_normal(logits.shape)
    grads, dx = classifier_backward(g, cache)
    # self-attention ignores a per-query shift of the scores: to_k.bias has an exactly-zero gradient
    check_network_grads(lambda q, xx: classifier_forward(q, config, xx, t, **kw)[0], p, x, g, grads, dx, coords, H,
                        TOL, zero_key=lambda key: key.endswith("to_k.bias"))


def test_classifier_gradcheck_every_parameter():
    _gradcheck(TINY, coords=2)


def test_classifier_gradcheck_variant_with_dropout():
    _gradcheck(VARIANT, coords=1, train=True)


def test_params_shared_with_the_unet_plus_head():
    p = classifier_init_params(TINY, K, seed=4)
    unet = init_params(TINY, seed=4)
    head = {"head.norm.weight": (16,), "head.norm.bias": (16,), "head.linear.weight": (K, 16), "head.linear.bias": (K,)}
    assert {k: v.shape for k, v in p.items() if k.startswith("head.")} == head
    shared = [k for k in p if not k.startswith("head.")]
    assert shared and all(k.split(".")[0] in ("time_embedding", "conv_in", "down_blocks", "mid_block") for k in shared)
    assert set(unet) - set(shared) == {k for k in unet if k.startswith(("up_blocks", "conv_norm_out", "conv_out"))}
    for k in shared:
        np.testing.assert_array_equal(p[k], unet[k])
    assert list(p) == list(classifier_param_shapes(TINY, K)) and all(v.dtype == np.float32 for v in p.values())


def test_log_prob_grad_is_the_gradient_of_log_p():
    p, (x, t) = _params(TINY), _inputs()
    y = np.array([2, 0])

    def log_p():
        return float(np.sum(log_softmax(classifier_forward(p, TINY, x, t)[0])[np.arange(2), y]))

    grad = log_prob_grad(p, TINY, x, t, y)
    idx, num = numeric_grad(log_p, x, h=H, max_coords=40)
    assert rel_error(grad.reshape(-1)[idx], num) < TOL
    # row n is grad log p(y_n | x_n): the same as one sample at a time
    for i in range(2):
        np.testing.assert_allclose(grad[i:i + 1], log_prob_grad(p, TINY, x[i:i + 1], t[i:i + 1], y[i:i + 1]),
                                   rtol=1e-10, atol=1e-14)


def test_classifier_against_diffusers_encoder(torch1):
    """Logits, dx and every parameter gradient vs diffusers' UNet2DModel blocks + a torch head, float64."""
    torch, diffusers = torch1, pytest.importorskip("diffusers")
    from minidiff.model.config import to_diffusers_config

    p, (x, t) = _params(TINY), _inputs()
    unet = init_params(TINY, dtype=np.float64) | {k: v for k, v in p.items() if not k.startswith("head.")}
    model = diffusers.UNet2DModel(**{k: v for k, v in to_diffusers_config(TINY).items() if not k.startswith("_")})
    model = model.double().eval()
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in unet.items()}, strict=True)
    head = {k: torch.tensor(v, requires_grad=True) for k, v in p.items() if k.startswith("head.")}
    xt = torch.tensor(x, requires_grad=True)
    half = TINY.block_out_channels[0] // 2  # [cos, sin] embedding in float64 (diffusers' is float32)
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    a = torch.tensor(t, dtype=torch.float64)[:, None] * freqs
    h = model.conv_in(xt)
    temb = model.time_embedding(torch.cat([torch.cos(a), torch.sin(a)], dim=1))
    for block in model.down_blocks:
        h, _ = block(h, temb)
    h = model.mid_block(h, temb)
    h = torch.nn.functional.silu(torch.nn.functional.group_norm(h, TINY.norm_num_groups, head["head.norm.weight"],
                                                                head["head.norm.bias"], TINY.norm_eps))
    ref = torch.nn.functional.linear(h.mean((2, 3)), head["head.linear.weight"], head["head.linear.bias"])
    g = np.random.default_rng(5).standard_normal(ref.shape)
    ref.backward(torch.from_numpy(g))
    logits, cache = classifier_forward(p, TINY, x, t)
    grads, dx = classifier_backward(g, cache)
    assert rel_error(logits, ref.detach().numpy()) < 1e-10
    assert rel_error(dx, xt.grad.numpy()) < 1e-10
    named = dict(model.named_parameters()) | head
    for k in p:  # to_k.bias: zero by symmetry on both sides (~1e-17), so only its size is compared
        ref_grad = named[k].grad.numpy()
        if k.endswith("to_k.bias"):
            assert np.abs(grads[k]).max() < 1e-12 and np.abs(ref_grad).max() < 1e-12, k
        else:
            assert rel_error(grads[k], ref_grad) < 1e-10, (k, rel_error(grads[k], ref_grad))


def test_classifier_bad_input():
    p, (x, t) = _params(TINY), _inputs()
    with pytest.raises(ValueError, match="num_classes must be an int >= 2"):
        classifier_param_shapes(TINY, 1)
    with pytest.raises(ValueError, match="unconditional"):
        classifier_param_shapes(dataclasses.replace(TINY, num_class_embeds=3), K)
    with pytest.raises(ValueError, match="missing"):
        classifier_forward({k: v for k, v in p.items() if k != "conv_in.bias"}, TINY, x, t)
    with pytest.raises(ValueError, match="x's dtype"):
        classifier_forward(p, TINY, x.astype(np.float32), t)
    with pytest.raises(ValueError, match="in_channels"):
        classifier_forward(p, TINY, x[:, :1], t)
    with pytest.raises(ValueError, match="multiples of 2"):
        classifier_forward(p, TINY, x[:, :, :7, :7], t)
    with pytest.raises(ValueError, match="t must have shape"):
        classifier_forward(p, TINY, x, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="labels must lie in"):
        log_prob_grad(p, TINY, x, t, np.array([0, K]))


@pytest.mark.gpu
def test_gpu_matches_cpu():
    """CuPy vs NumPy in float64: forward, backward and log_prob_grad."""
    cp = pytest.importorskip("cupy")
    from minidiff.backend import gpu_available, to_device

    if not gpu_available():
        pytest.skip("no CUDA device")
    p, (x, t) = _params(TINY), _inputs()
    g = np.random.default_rng(5).standard_normal((2, K))
    logits, cache = classifier_forward(p, TINY, x, t)
    grads, dx = classifier_backward(g, cache)
    pg = to_device(p, "gpu")
    logits_g, cache_g = classifier_forward(pg, TINY, cp.asarray(x), t)
    grads_g, dx_g = classifier_backward(cp.asarray(g), cache_g)
    assert rel_error(logits_g, logits) < 1e-10 and rel_error(dx_g, dx) < 1e-10
    assert all(rel_error(grads_g[k], grads[k]) < 1e-9 or np.abs(grads[k]).max() < 1e-12 for k in p)
    y = np.array([1, 2])
    assert rel_error(log_prob_grad(pg, TINY, cp.asarray(x), t, y), log_prob_grad(p, TINY, x, t, y)) < 1e-10
