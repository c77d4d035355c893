"""Adam / AdamW, linear warm-up, global-norm gradient clipping, and an EMA of the weights.

Shape legend: every array has the shape of its parameter; params, grads and optimizer state are
flat dicts keyed by the same state-dict names. Updates happen in place, on the params' backend.

Adam (Kingma & Ba 2015, Alg. 1, with PyTorch's torch.optim.Adam placement of eps), step t = 1, 2, ...:
    g   = grad + weight_decay * p                       (Adam: L2 penalty folded into the gradient)
    p   = p * (1 - lr * weight_decay)                   (AdamW: decoupled decay, Loshchilov & Hutter)
    m   = beta1 * m + (1 - beta1) * g                   exp_avg
    v   = beta2 * v + (1 - beta2) * g^2                 exp_avg_sq
    p   = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Linear warm-up (DDPM trains with 5000 warm-up steps):
    lr(step) = base_lr * min(1, (step + 1) / warmup_steps)     step = updates done so far (0-based)

Global-norm clipping (torch.nn.utils.clip_grad_norm_):
    total_norm = sqrt(sum_k ||g_k||^2);  g_k *= min(1, max_norm / (total_norm + 1e-6))

EMA of the weights (what sampling uses), update number n = 1, 2, ...:
    decay_n = min(decay, (1 + s) / (10 + s)) with s = n - 1, and decay_1 = 0   (warmup=True,
              the same numbers as diffusers' EMAModel(decay) with its default arguments)
    decay_n = decay                                                            (warmup=False)
    ema = ema - (1 - decay_n) * (ema - p)

When the params are a flat.FlatDict (one buffer behind all tensors, as the Trainer makes them),
the state is one too, and each rule runs once on the whole buffers instead of once per tensor:
the same numbers (bit for bit for Adam and the EMA), a few array ops instead of thousands. On CuPy
each update is one kernel (optim_cuda.py: the same lines, rounded as the array ops round them).
"""

from __future__ import annotations

import math

import numpy as np

from .. import backend
from ..fast import flat
from ..backend import get_array_module, to_numpy
from ..fast.cuda.optim import adam_update_cuda, ema_update_cuda


def _check_keys(name: str, got: dict, want: dict) -> None:
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(f"{name} must have the same keys as the parameters; missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class Adam:
    """torch.optim.Adam semantics (decoupled=False) or torch.optim.AdamW (decoupled=True)."""

    def __init__(self, params: dict, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        self.lr = _positive("lr", lr, allow_zero=True)
        self.betas = tuple(float(b) for b in betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.eps = _positive("eps", eps, allow_zero=True)
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.decoupled = bool(decoupled)
        self.step_count = 0  # t, the number of updates applied
        self.exp_avg = flat.zeros_like(params)  # m (a FlatDict when params is one)
        self.exp_avg_sq = flat.zeros_like(params)  # v

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One update of params in place from grads (same keys); lr overrides self.lr for this step."""
        _check_keys("grads", grads, self.exp_avg)
        _check_keys("params", params, self.exp_avg)
        lr = self.lr if lr is None else _positive("lr", lr, allow_zero=True)
        beta1, beta2 = self.betas
        wd = self.weight_decay
        self.step_count += 1
        t = self.step_count
        bias_correction1 = 1.0 - beta1 ** t
        bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** t)
        step_size = lr / bias_correction1
        grads = grads if isinstance(grads, flat.FlatDict) else flat.gather(grads, like=params)
        # all four flat: one update of the whole buffers (their zero gaps give 0 / (0 + eps) = 0, so not with eps = 0)
        whole = flat.buffers(params, grads, self.exp_avg, self.exp_avg_sq) if self.eps > 0 else None
        groups = flat.pieces(whole) if whole else [(params[k], grads[k], self.exp_avg[k], self.exp_avg_sq[k])
                                                    for k in params]
        for p, g, m, v in groups:
            xp = get_array_module(p)
            if xp is not np and backend.FUSED:  # the lines below in one CuPy kernel (optim_cuda.py)
                adam_update_cuda(xp, p, g, m, v, lr=lr, betas=self.betas, eps=self.eps, weight_decay=wd,
                                 decoupled=self.decoupled, bias_correction2_sqrt=bias_correction2_sqrt,
                                 step_size=step_size)
                continue
            if wd != 0.0 and self.decoupled:
                p *= 1.0 - lr * wd  # p = p (1 - lr wd)
            elif wd != 0.0:
                g = g + wd * p  # g = grad + wd p
            m *= beta1
            m += (1.0 - beta1) * g  # m = beta1 m + (1 - beta1) g
            v *= beta2
            v += (1.0 - beta2) * (g * g)  # v = beta2 v + (1 - beta2) g^2
            denom = xp.sqrt(v) / bias_correction2_sqrt + self.eps  # sqrt(v_hat) + eps
            p -= step_size * (m / denom)  # p = p - lr m_hat / (sqrt(v_hat) + eps)

    def state_dict(self) -> dict:
        """{"step": t, "hparams": {...}, "exp_avg": {k: array}, "exp_avg_sq": {k: array}} (host arrays)."""
        return {
            "step": self.step_count,
            "hparams": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps,
                        "weight_decay": self.weight_decay, "decoupled": self.decoupled},
            "exp_avg": {k: to_numpy(v).copy() for k, v in self.exp_avg.items()},
            "exp_avg_sq": {k: to_numpy(v).copy() for k, v in self.exp_avg_sq.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore step and moments (copied onto the params' backend and dtype); hparams must match."""
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key not in state:
                raise ValueError(f"optimizer state must have the key {key!r}, got {sorted(state)}")
        _check_keys("state['exp_avg']", state["exp_avg"], self.exp_avg)
        _check_keys("state['exp_avg_sq']", state["exp_avg_sq"], self.exp_avg_sq)
        mine = {"betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "decoupled": self.decoupled}  # lr may change on resume (warm-up sets it per step)
        for name, value in state.get("hparams", {}).items():
            if name in mine and mine[name] != value:
                raise ValueError(f"optimizer state has {name}={value}, but this optimizer has "
                                 f"{name}={mine.get(name)}; use the same optimizer settings to resume")
        for src, dst in ((state["exp_avg"], self.exp_avg), (state["exp_avg_sq"], self.exp_avg_sq)):
            for k, v in src.items():
                xp = get_array_module(dst[k])
                dst[k][...] = xp.asarray(v, dtype=dst[k].dtype)
        self.step_count = int(state["step"])


class AdamW(Adam):
    """torch.optim.AdamW: decoupled weight decay p = p (1 - lr wd) (default wd = 0.01, as in PyTorch)."""

    def __init__(self, params: dict, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """lr(step) = base_lr * min(1, (step + 1) / warmup_steps); warmup_steps 0 means constant base_lr."""
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if warmup_steps == 0:
        return float(base_lr)
    return float(base_lr) * min(1.0, (step + 1) / warmup_steps)


def clip_grad_norm(grads: dict, max_norm: float):
    """Scale all grads in place by min(1, max_norm / (total_norm + 1e-6)); return total_norm.

    total_norm = sqrt(sum_k ||g_k||_2^2) over every array, returned as a 0-d array on the grads'
    backend: nothing is read back to the host (no GPU synchronization), as torch does it, by
    multiplying with the clamped coefficient even when it is 1. A nan/inf total_norm makes the
    grads nan, for the caller to stop on (torch's error_if_nonfinite=False).
    """
    max_norm = _positive("max_norm", max_norm)
    if not grads:
        return 0.0
    xp = get_array_module(*grads.values())
    whole = flat.buffers(grads)  # a FlatDict: its one buffer (the alignment gaps are zeros)
    arrays = [g for g, in flat.pieces(whole)] if whole else list(grads.values())
    sq = sum(xp.linalg.norm(g.ravel()) ** 2 for g in arrays)  # sum_k ||g_k||_2^2
    total_norm = xp.sqrt(sq)  # 0-d, stays on the device
    clip_coef = xp.minimum(max_norm / (total_norm + 1e-6), 1.0)  # nan stays nan
    for g in arrays:
        g *= clip_coef.astype(g.dtype)
    return total_norm


class EMA:
    """Exponential moving average of the weights: ema = ema - (1 - decay_n) (ema - p)."""

    def __init__(self, params: dict, decay: float = 0.9999, warmup: bool = True):
        self.decay = float(decay)
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.warmup = bool(warmup)
        self.num_updates = 0  # n, updates applied so far
        self.shadow = flat.copy(params)  # the averaged weights (a FlatDict when params is one)

    def decay_at(self, n: int) -> float:
        """decay_n of update number n (1-based); see the module docstring."""
        if not self.warmup:
            return self.decay
        s = n - 1
        return 0.0 if s <= 0 else min(self.decay, (1.0 + s) / (10.0 + s))

    def update(self, params: dict) -> float:
        """Fold the current params into the average (in place); return the decay used."""
        _check_keys("params", params, self.shadow)
        self.num_updates += 1
        d = self.decay_at(self.num_updates)
        whole = flat.buffers(self.shadow, params)  # both flat: one update of the whole buffers
        for e, p in flat.pieces(whole) if whole else [(e, params[k]) for k, e in self.shadow.items()]:
            if get_array_module(e) is not np and backend.FUSED:
                ema_update_cuda(get_array_module(e), e, p, d)  # the line below in one CuPy kernel
                continue
            e -= (1.0 - d) * (e - p)  # ema = ema - (1 - decay) (ema - p)
        return d

    def state_dict(self) -> dict:
        """{"num_updates": n, "decay": d, "warmup": bool, "shadow": {k: host array}}."""
        return {"num_updates": self.num_updates, "decay": self.decay, "warmup": self.warmup,
                "shadow": {k: to_numpy(v).copy() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore the average and the update count (onto the shadow's backend and dtype)."""
        if "shadow" not in state or "num_updates" not in state:
            raise ValueError(f"EMA state must have the keys 'shadow' and 'num_updates', got {sorted(state)}")
        _check_keys("state['shadow']", state["shadow"], self.shadow)
        for k, v in state["shadow"].items():
            self.shadow[k][...] = get_array_module(self.shadow[k]).asarray(v, dtype=self.shadow[k].dtype)
        self.num_updates = int(state["num_updates"])
        self.decay = float(state.get("decay", self.decay))
        self.warmup = bool(state.get("warmup", self.warmup))
