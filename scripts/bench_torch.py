"""The PyTorch side of `minidiff bench`: diffusers' UNet2DModel with the same config, weights and
inputs as minidiff's network, timed the same way (see minidiff/bench.py, which loads this file).

It lives in scripts/ because minidiff/ never imports torch or diffusers.
"""

from __future__ import annotations

from minidiff.bench import LR, T_SAMPLE
from minidiff.model.config import to_diffusers_config


def make_torch_side(config, host_params, inputs, device, dtype, note, threads=None, tf32=False):
    """diffusers' UNet2DModel twin (same config, same weights), or None with a note when unavailable."""
    try:
        import diffusers  # noqa: PLC0415  (optional: the comparison only)
        import torch  # noqa: PLC0415
    except ImportError as err:
        note(f"torch side skipped: {err}; pip install torch==2.13.0 diffusers to compare with PyTorch")
        return None
    if device == "gpu" and not torch.cuda.is_available():
        note("torch side skipped: this PyTorch build sees no CUDA device")
        return None
    if device == "cpu":
        if threads is not None:
            torch.set_num_threads(threads)
        note(f"torch threads: {torch.get_num_threads()}")
    return TorchSide(torch, diffusers, config, host_params, inputs, device, dtype, tf32)


class TorchSide:
    """The same network, weights and inputs as UNet2DModel in PyTorch eager mode."""

    def __init__(self, torch, diffusers, config, host_params, inputs, device, dtype, tf32=False):
        self.torch = torch
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        if device == "gpu":  # float32 means float32 on both sides: TF32 in cuDNN convs and matmuls only with --tf32
            torch.backends.cudnn.allow_tf32 = bool(tf32)
            torch.backends.cuda.matmul.allow_tf32 = bool(tf32)
        kwargs = {k: v for k, v in to_diffusers_config(config).items() if not k.startswith("_")}
        model = diffusers.UNet2DModel(**kwargs)
        model = model.double() if dtype == "float64" else model  # (not .to(): diffusers warns there)
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in host_params.items()}, strict=True)
        self.model = model.to(self.dev)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=1e-2)
        self.x0, self.noise, self.t, self.x_s = (torch.from_numpy(inputs[k]).to(self.dev)
                                                 for k in ("x0", "noise", "t", "x_s"))
        self.x_t = torch.from_numpy(inputs["x_t"]).to(self.dev)
        self.t_s = torch.full((self.x0.shape[0],), T_SAMPLE, dtype=torch.int64, device=self.dev)
        self.scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                 clip_sample=False, set_alpha_to_one=True)
        self.scheduler.set_timesteps(50)  # leading spacing: 980, 960, ..., 500, 480, ..., 0

    def sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def train_step(self):
        self.model.train()
        out = self.model(self.x_t, self.t).sample
        loss = self.torch.nn.functional.mse_loss(out, self.noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss

    def forward_eval(self):
        """eps of the sampling inputs, in eval mode, as a host array (for the same-network check)."""
        self.model.eval()
        with self.torch.no_grad():
            return self.model(self.x_s, self.t_s).sample.cpu().numpy()

    def sample_step(self):
        self.model.eval()
        with self.torch.no_grad():
            out = self.model(self.x_s, self.t_s).sample
            return self.scheduler.step(out, T_SAMPLE, self.x_s, eta=0.0).prev_sample

    def peak_mb(self, fn) -> float | None:
        if self.dev.type != "cuda":
            return None  # PyTorch's CPU allocator is invisible to tracemalloc: not measured
        self.sync()
        base = self.torch.cuda.memory_allocated()
        self.torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        return (self.torch.cuda.max_memory_allocated() - base) / 2**20
