"""minidiff's U-Net against diffusers' UNet2DModel (PyTorch autograd), in float64.

The same config builds both networks; minidiff's params are loaded into the diffusers model with
torch.from_numpy. Outputs must agree to rel < 1e-10, and so must the parameter and input
gradients for a random upstream gradient.

One substitution: diffusers' Timesteps always computes the sinusoidal embedding in float32
(torch.arange(..., dtype=float32), timesteps.float()), whatever the model dtype; at t ~ 1000 that
rounds the angles by ~1e-4. For the float64 comparison the twin's time_proj is replaced by the same
formula in float64 (get_timestep_embedding's op order). A separate float32 test keeps diffusers'
own Timesteps and checks agreement at float32 precision.
"""

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from minidiff.model.attention_block import attention_block_backward, attention_block_forward
from minidiff.model.unet import count_params, init_params, param_shapes, unet_backward, unet_forward
from minidiff.model.config import PRESETS, UNetConfig, from_diffusers_config, get_preset, to_diffusers_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = get_preset("tiny")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """These networks are tiny: one thread is 10x faster than two on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Float64Timesteps(torch.nn.Module):
    """diffusers.models.embeddings.get_timestep_embedding, computed in float64 (see module docstring)."""

    def __init__(self, dim, flip_sin_to_cos, shift):
        super().__init__()
        self.dim, self.flip, self.shift = dim, flip_sin_to_cos, shift

    def forward(self, t):
        half = self.dim // 2
        exponent = -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - self.shift)
        a = t[:, None].double() * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.sin(a), torch.cos(a)], dim=-1)
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1) if self.flip else emb
        return torch.nn.functional.pad(emb, (0, self.dim % 2))


def _diffusers_model(config, params=None, float64_time=True):
    kwargs = {k: v for k, v in to_diffusers_config(config).items() if not k.startswith("_")}
    model = diffusers.UNet2DModel(**kwargs)
    if params is not None:
        dtype = next(iter(params.values())).dtype
        model = model.double() if dtype == np.float64 else model
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=True)
    if float64_time:
        model.time_proj = Float64Timesteps(config.block_out_channels[0], config.flip_sin_to_cos, config.freq_shift)
    return model.eval()


def _rel(a, b, floor=0.0):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max(), floor, 1e-300))


def _compare(config, seed=0, batch=2):
    """Forward, input gradient and every parameter gradient of minidiff vs UNet2DModel in float64."""
    rng = np.random.default_rng(seed)
    params = init_params(config, seed=seed, dtype=np.float64)
    for k, v in params.items():  # GroupNorm affine params off 1/0, so their gradients are generic
        if v.ndim == 1 and "norm" in k:
            params[k] = v + 0.2 * rng.standard_normal(v.shape)
    size = config.sample_size
    x = rng.standard_normal((batch, config.in_channels, size, size))
    t = rng.integers(0, 1000, size=batch)
    labels = rng.integers(0, config.num_class_embeds, size=batch) if config.num_class_embeds else None
    eps, cache = unet_forward(params, config, x, t, class_labels=labels)
    g = rng.standard_normal(eps.shape)
    grads, dx = unet_backward(g, cache)

    model = _diffusers_model(config, params)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = model(xt, torch.from_numpy(t), class_labels=None if labels is None else torch.from_numpy(labels)).sample
    out.backward(torch.from_numpy(g))
    assert _rel(eps, out.detach().numpy()) < 1e-10
    torch_grads = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert torch_grads.keys() == grads.keys()
    scale = max(np.abs(v).max() for v in [*torch_grads.values(), xt.grad.numpy()])
    # A dead output norm: conv_norm_out normalizes groups of one element (one channel per group, a 1x1
    # image), so it outputs its bias whatever its input, and dx and every gradient but those of its bias and
    # conv_out are zero in exact arithmetic. Both sides then hold rounding noise, amplified by
    # rstd = 1 / sqrt(eps) (~316) at each such GroupNorm: up to 1.1e-13 of the largest gradient (seen in
    # the examples below). Such gradients must be noise-sized on both sides, not equal to each other.
    dead = config.block_out_channels[0] // config.norm_num_groups * config.sample_size**2 == 1
    zero = {k for k in grads if dead and k not in ("conv_norm_out.bias", "conv_out.weight", "conv_out.bias")}
    for k, got, want in [("dx", dx, xt.grad.numpy())] + [(k, grads[k], torch_grads[k]) for k in grads]:
        if dead and (k == "dx" or k in zero):
            assert max(np.abs(got).max(), np.abs(want).max()) < 1e-11 * scale, k
        else:  # floor: some gradients are mathematically zero, or cancel to ~1e-9 of the others, and both
            # sides then hold rounding noise: to_k.bias (softmax is shift-invariant), the inputs of a
            # GroupNorm whose groups hold one or two elements. Any real error is O(1).
            assert _rel(got, want, floor=1e-3 * scale) < 1e-10, k


CASES = {
    "tiny (attention, padding 1)": TINY,
    "class-conditional, padding 0": dataclasses.replace(TINY, num_class_embeds=4, downsample_padding=0),
    "no attention anywhere": dataclasses.replace(TINY, down_block_types=("DownBlock2D",) * 2,
                                                 up_block_types=("UpBlock2D",) * 2, add_attention=False),
    "ddpm-style: one head, [sin, cos], shift 1, padding 0, mid scale 2": dataclasses.replace(
        TINY, attention_head_dim=None, flip_sin_to_cos=False, freq_shift=1, downsample_padding=0,
        mid_block_scale_factor=2.0, norm_eps=1e-6),
    "three resolutions, 2 layers, class": UNetConfig(
        sample_size=8, in_channels=2, out_channels=1, block_out_channels=(4, 8, 8), layers_per_block=2,
        down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D"), attention_head_dim=4,
        norm_num_groups=2, num_class_embeds=3, time_embedding_dim=12),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_unet2dmodel_float64(name):
    _compare(CASES[name])


@st.composite
def configs(draw):
    n = draw(st.integers(1, 3))
    base = draw(st.sampled_from([2, 4]))
    channels = tuple(base * draw(st.sampled_from([1, 2])) for _ in range(n))
    attn = st.sampled_from(["", "Attn"])
    return UNetConfig(
        sample_size=2 ** (n - 1) * draw(st.sampled_from([1, 2])), in_channels=draw(st.integers(1, 3)),
        out_channels=draw(st.integers(1, 3)), block_out_channels=channels, layers_per_block=draw(st.integers(1, 2)),
        down_block_types=tuple(draw(attn) + "DownBlock2D" for _ in range(n)),
        up_block_types=tuple(draw(attn) + "UpBlock2D" for _ in range(n)), add_attention=draw(st.booleans()),
        attention_head_dim=draw(st.sampled_from([None, base])), norm_num_groups=draw(st.sampled_from([1, 2])),
        norm_eps=draw(st.sampled_from([1e-5, 1e-6])), flip_sin_to_cos=draw(st.booleans()),
        freq_shift=draw(st.sampled_from([0, 1] if base > 2 else [0])), downsample_padding=draw(st.sampled_from([0, 1])),
        mid_block_scale_factor=draw(st.sampled_from([1.0, 1.5])),
        num_class_embeds=draw(st.sampled_from([None, 3])), time_embedding_dim=draw(st.sampled_from([None, 6])))


@given(configs(), st.integers(0, 2**16))
@example(UNetConfig(sample_size=1, in_channels=1, out_channels=1, block_out_channels=(2,), layers_per_block=1,
                    down_block_types=("AttnDownBlock2D",), up_block_types=("AttnUpBlock2D",),
                    attention_head_dim=None, norm_num_groups=1), 0)  # one block, 1x1 image: no resampling
@example(UNetConfig(sample_size=2, in_channels=1, out_channels=1, block_out_channels=(2, 2), layers_per_block=1,
                    down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2, add_attention=False,
                    attention_head_dim=None, norm_num_groups=2, flip_sin_to_cos=False, downsample_padding=0),
         0)  # found by hypothesis: 1x1 mid-block GroupNorm over 1 element per group, zero temb gradients
@example(UNetConfig(sample_size=1, in_channels=1, out_channels=1, block_out_channels=(2,), layers_per_block=1,
                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), add_attention=False,
                    attention_head_dim=None, norm_num_groups=2, flip_sin_to_cos=False, downsample_padding=0),
         1)  # found by hypothesis: GroupNorm over 1 element -> exact-zero gradients vs torch's 1e-15 noise
@example(UNetConfig(sample_size=1, in_channels=2, out_channels=1, block_out_channels=(2,), layers_per_block=2,
                    down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), add_attention=True,
                    attention_head_dim=None, norm_num_groups=2, flip_sin_to_cos=False, downsample_padding=0),
         65535)  # found by hypothesis (dev profile): a dead output norm, conv_in's noise 1.1e-13 of the scale
def test_random_configs_match_unet2dmodel(config, seed):
    _compare(config, seed)


def test_float32_matches_with_diffusers_own_timesteps():
    params = init_params(TINY, seed=3)
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([1, 999])
    eps, _ = unet_forward(params, TINY, x, t)
    with torch.no_grad():
        ref = _diffusers_model(TINY, params, float64_time=False)(torch.from_numpy(x), torch.from_numpy(t)).sample
    assert _rel(eps, ref.numpy()) < 1e-5


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_have_unet2dmodel_names_order_shapes_and_counts(name):
    config = get_preset(name)
    model = _diffusers_model(config, float64_time=False)
    state = model.state_dict()
    assert list(state) == list(param_shapes(config))  # same keys, same order as state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == param_shapes(config)
    assert sum(p.numel() for p in model.parameters()) == count_params(config)
    assert from_diffusers_config(dict(model.config)) == config  # config.json -> the same UNetConfig


def test_cross_attention_block_matches_attention_with_added_kv():
    """minidiff's cross-attention = diffusers Attention(added_kv_proj_dim=Cd) + AttnAddedKVProcessor."""
    from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor

    rng = np.random.default_rng(0)
    N, C, Hs, S, Cd, heads, groups = 2, 8, 4, 3, 6, 2, 4
    attn = Attention(C, heads=heads, dim_head=C // heads, added_kv_proj_dim=Cd, norm_num_groups=groups, eps=1e-6,
                     bias=True, residual_connection=True, processor=AttnAddedKVProcessor()).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
    params = {"blk." + k: v.detach().numpy().copy() for k, v in attn.state_dict().items()}
    x, ctx = rng.standard_normal((N, C, Hs, Hs)), rng.standard_normal((N, S, Cd))
    y, cache = attention_block_forward(params, "blk.", x, heads, groups, 1e-6, ctx, np.ones((N, S), bool))
    dy = rng.standard_normal(y.shape)
    grads = {}
    dx, dctx = attention_block_backward(dy, cache, grads)
    xt, ct = torch.from_numpy(x).requires_grad_(True), torch.from_numpy(ctx).requires_grad_(True)
    out = attn(xt, encoder_hidden_states=ct)
    out.backward(torch.from_numpy(dy))
    assert _rel(y, out.detach().numpy()) < 1e-10
    assert _rel(dx, xt.grad.numpy()) < 1e-10 and _rel(dctx, ct.grad.numpy()) < 1e-10
    assert grads.keys() == params.keys()
    for k, p in attn.named_parameters():
        assert _rel(grads["blk." + k], p.grad.numpy()) < 1e-10, k
