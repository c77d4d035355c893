"""The two sides `minidiff bench` (bench.py) times: minidiff's training and sampling step, run by the ops
table of `minidiff train`, and the loader of PyTorch's twin (scripts/bench_torch.py, outside minidiff/, which
never imports torch); and the host inputs both share.

    train step  = ops.map_batch(loss_and_grads) + AdamW.step, as Trainer.train_step runs them
    sample step = ops.map_forward(model_output) + ops.ddim_step, 50-step DDIM at t = T_SAMPLE -> T_PREV

Shape legend: N batch, C image channels, S image side.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .backend import synchronize, to_device, to_numpy, xp_for
from .bench_timing import cpu_peak_mb
from .diffusion.schedule import add_noise
from .fast.ops import fast_ops
from .model.dropout import draw_dropout_masks
from .nn.ops import REFERENCE
from .training.bundle import model_output
from .training.optim import AdamW
from .training.trainer import loss_and_grads

T_SAMPLE, T_PREV = 500, 480  # one step of 50-step DDIM with "leading" spacing (timesteps 980, 960, ..., 0)
LR = 2e-4  # AdamW learning rate of the timed step (weight decay 0.01 on both sides, PyTorch's default)


class MinidiffSide:
    """minidiff's params, AdamW state and inputs on the chosen device, and its two steps, run by the ops
    table of `minidiff train`: fast (the batch in `workers` shards in `shards`) or, with reference, REFERENCE."""

    def __init__(self, config, host_params, inputs, device, schedule, workers=1, shards="threads", reference=False):
        self.config, self.device, self.schedule = config, device, schedule
        self.workers, self.shards, self.reference = workers, shards, reference
        self.ops = self._ops(shards)
        self.xp = xp_for(device)
        self.params = self.ops.arrange_params(to_device(host_params, device))  # as the Trainer's
        self.opt = AdamW(self.params, lr=LR, ops=self.ops)
        self.x0, self.noise, self.x_s = (to_device(inputs[k], device) for k in ("x0", "noise", "x_s"))
        self.t = inputs["t"]  # (N,) on the host, as Trainer keeps it: the checks read t, a sync on a device
        self.t_s = self.xp.full((self.x0.shape[0],), T_SAMPLE, dtype=np.int64)
        self.rng = np.random.default_rng(0)  # network dropout (ddpm-cifar10 has dropout 0.1)

    def _ops(self, shards):
        return REFERENCE if self.reference else fast_ops(self.workers, shards)

    def sync(self):
        synchronize()

    def train_step(self):  # what Trainer.train_step does, on fixed inputs
        masks = None
        if self.config.dropout > 0:
            masks = draw_dropout_masks(self.config, self.rng, self.x0.shape, self.xp)
        batch = dict(x0=self.x0, eps=self.noise, t=self.t, class_labels=None, context=None, dropout_masks=masks)
        loss, grads = self.ops.map_batch(loss_and_grads, batch, params=self.params, config=self.config,
                                         schedule=self.schedule, ops=self.ops)
        self.opt.step(self.params, grads)
        return loss

    def sample_step(self):
        batch = dict(x=self.x_s, t=self.t_s, class_labels=None, context=None)
        eps = self.ops.map_forward(model_output, batch, params=self.params, config=self.config, ops=self.ops)
        return self.ops.ddim_step(self.schedule, eps, T_SAMPLE, T_PREV, self.x_s)[0]

    def peak_mb(self, fn) -> float | None:
        if self.device == "cpu":  # tracemalloc sees this process only: worker processes' shards run here for it
            ops, self.ops = self.ops, self._ops("threads")
            try:
                return cpu_peak_mb(fn)
            finally:
                self.ops = ops
        pool = self.xp.get_default_memory_pool()
        self.sync()
        pool.free_all_blocks()  # the pool then grows exactly to the step's high-water mark
        base = pool.used_bytes()
        fn()
        self.sync()
        return (pool.total_bytes() - base) / 2**20


def load_torch_side():
    """The PyTorch side of the comparison, scripts/bench_torch.py, loaded from the source checkout.

    minidiff/ never imports torch: the diffusers twin lives in scripts/ beside the other optional
    cross-checks. Returns its make_torch_side(config, host_params, inputs, device, dtype, note)
    function, or None when this is not a source checkout (then only minidiff's numbers are printed).
    """
    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_torch.py"
    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location("minidiff_bench_torch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_torch_side


def make_inputs(config, batch: int, size: int, dtype, seed: int, schedule) -> dict:
    """Host inputs shared by both sides: x0, noise, x_t (N, C, S, S), t (N,), the sampler's x_s."""
    rng = np.random.default_rng(seed)
    shape = (batch, config.in_channels, size, size)
    x0 = rng.uniform(-1, 1, shape).astype(dtype)
    noise = rng.standard_normal(shape).astype(dtype)
    t = rng.integers(0, schedule.num_train_timesteps, batch).astype(np.int64)
    x_t = to_numpy(add_noise(schedule, x0, noise, t)).astype(dtype)
    x_s = rng.standard_normal(shape).astype(dtype)
    return dict(x0=x0, noise=noise, t=t, x_t=x_t, x_s=x_s)
