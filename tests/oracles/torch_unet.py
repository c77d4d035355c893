"""diffusers' UNet2DModel, a plain PyTorch model, as a `minidiff oracle` adapter for the U-Net cases: the
fixtures' tiny U-Net weights loaded by their state-dict names, forward and backward (torch autograd) in
float64. The class below is the glue an implementer writes (20 lines); tests/test_oracle.py runs it and
plants bugs into it. From tests/: `python -m minidiff oracle --adapter oracles.torch_unet:TorchUNet`.
Imported by tests only; needs torch and diffusers.

One substitution: diffusers' Timesteps computes the sinusoid in float32 whatever the model dtype (the angles
round by ~1e-4 at t ~ 1000), so time_proj is replaced by the same formula in float64, which also serves the
timestep_embedding cases; with diffusers' own Timesteps the U-Net passes at precision "float32" only
(docs/oracle.md, section 2). The tiny U-Net has no cross-attention, which UNet2DModel could not express
(to_diffusers_config refuses a cross_attention_dim), so every U-Net case runs.
"""

import math

import diffusers
import torch

from minidiff.model.config import get_preset, to_diffusers_config


class TorchUNet:  # precision "float64", the harness's default
    def timestep_embedding(self, t, dim, flip_sin_to_cos, downscale_freq_shift):  # get_timestep_embedding, float64
        half = dim // 2
        a = torch.as_tensor(t, dtype=torch.float64)[:, None] * torch.exp(
            -math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - downscale_freq_shift))
        return torch.nn.functional.pad(torch.cat([a.cos(), a.sin()] if flip_sin_to_cos else [a.sin(), a.cos()], 1),
                                       (0, dim % 2))  # an odd dim ends in a zero

    def model(self, params):
        c = to_diffusers_config(get_preset("tiny"))
        model = diffusers.UNet2DModel(**{k: v for k, v in c.items() if not k.startswith("_")}).double().eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()}, strict=True)
        emb = (c["block_out_channels"][0], c["flip_sin_to_cos"], c["freq_shift"])
        model.time_proj.forward = lambda t: self.timestep_embedding(t, *emb)  # not diffusers' float32 Timesteps
        return model

    def unet_forward(self, params, x, t):
        return self.model(params)(torch.from_numpy(x), torch.from_numpy(t)).sample

    def unet_backward(self, params, x, t, dy):
        model, x = self.model(params), torch.tensor(x, requires_grad=True)
        model(x, torch.from_numpy(t)).sample.backward(torch.from_numpy(dy))
        return {"x": x.grad, **{k: p.grad for k, p in model.named_parameters()}}
