"""Adam / AdamW, linear warm-up, global-norm gradient clipping, and an EMA of the weights.

Shape legend: every array has the shape of its parameter; params, grads and optimizer state are
flat dicts keyed by the same state-dict names. Updates happen in place, on the params' backend.

Adam (Kingma & Ba 2015, Alg. 1, with PyTorch's torch.optim.Adam placement of eps), step t = 1, 2, ...:
    g   = grad + weight_decay * p                       (Adam: L2 penalty folded into the gradient)
    p   = p * (1 - lr * weight_decay)                   (AdamW: decoupled decay, Loshchilov & Hutter)
    m   = beta1 * m + (1 - beta1) * g                   exp_avg
    v   = beta2 * v + (1 - beta2) * g^2                 exp_avg_sq
    p   = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Linear warm-up (DDPM trains with 5000 warm-up steps), then a decay to 0 at the last step (lr_at):
    lr(step) = base_lr * min(1, (step + 1) / warmup_steps)     step = updates done so far (0-based)
    p = (step - warmup) / (total - warmup)  after the warm-up:  constant 1,  linear 1 - p,
    cosine (1 + cos(pi p)) / 2  (diffusers' get_cosine_schedule_with_warmup, one half-cycle)

EMA of the weights (what sampling uses), update number n = 1, 2, ...:
    decay_n = min(decay, (1 + s) / (10 + s)) with s = n - 1, and decay_1 = 0   (warmup=True,
              the same numbers as diffusers' EMAModel(decay) with its default arguments)
    decay_n = decay                                                            (warmup=False)
    ema = ema - (1 - decay_n) * (ema - p)

The update rules themselves (and global-norm clipping, clip_grad_norm) are nn/optim.py's, called through the ops
table passed in (ops=REFERENCE by default): these classes hold the state (the moments, the step
count, the average) and the hyperparameters, and check what comes in. The state is arranged as the
table arranges parameters (ops.arrange_params: FAST puts each dict in one flat buffer, and its
rules then update the whole buffers in a few array ops, or in one kernel on CuPy).
"""

from __future__ import annotations

import math

from ..backend import get_array_module, to_numpy
from ..nn.ops import REFERENCE


def _check_keys(name: str, got: dict, want: dict) -> None:
    if set(got) != set(want):
        missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        raise ValueError(f"{name} must have the same keys as the parameters; missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    for k, v in got.items():
        if tuple(v.shape) != tuple(want[k].shape):
            raise ValueError(f"{name}[{k!r}] has shape {tuple(v.shape)}, expected {tuple(want[k].shape)}")


def _zeros_like(params: dict) -> dict:
    return {k: get_array_module(p).zeros_like(p) for k, p in params.items()}


def _positive(name: str, value: float, allow_zero: bool = False) -> float:
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value}")
    return value


class Adam:
    """torch.optim.Adam semantics (decoupled=False) or torch.optim.AdamW (decoupled=True)."""

    def __init__(self, params: dict, lr: float = 2e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False, *, ops=REFERENCE):
        self.lr = _positive("lr", lr, allow_zero=True)
        self.betas = tuple(float(b) for b in betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        self.eps = _positive("eps", eps, allow_zero=True)
        self.weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
        self.decoupled = bool(decoupled)
        self.ops = ops  # ops.adam_update(...) is the rule; ops.arrange_params holds the state like the params
        self.step_count = 0  # t, the number of updates applied
        self.exp_avg = ops.arrange_params(_zeros_like(params))  # m
        self.exp_avg_sq = ops.arrange_params(_zeros_like(params))  # v

    def step(self, params: dict, grads: dict, lr: float | None = None) -> None:
        """One update of params in place from grads (same keys); lr overrides self.lr for this step."""
        _check_keys("grads", grads, self.exp_avg)
        _check_keys("params", params, self.exp_avg)
        lr = self.lr if lr is None else _positive("lr", lr, allow_zero=True)
        self.step_count += 1
        self.ops.adam_update(params, grads, self.exp_avg, self.exp_avg_sq, lr=lr, betas=self.betas, eps=self.eps,
                             weight_decay=self.weight_decay, decoupled=self.decoupled, step=self.step_count)

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
                 weight_decay: float = 1e-2, *, ops=REFERENCE):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True, ops=ops)


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """lr(step) = base_lr * min(1, (step + 1) / warmup_steps); warmup_steps 0 means constant base_lr."""
    if isinstance(step, bool) or int(step) != step or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(warmup_steps, bool) or int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
    if warmup_steps == 0:
        return float(base_lr)
    return float(base_lr) * min(1.0, (step + 1) / warmup_steps)


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, base_lr: float, warmup_steps: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """lr(step) = warmup_lr(step) * f(p), p = (step - warmup) / (total - warmup): f = 1 (constant), 1 - p
    (linear), (1 + cos(pi p)) / 2 (cosine); 'constant' is warmup_lr itself, to the bit."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr-schedule must be one of {list(LR_SCHEDULES)}, got {schedule!r}")
    lr = warmup_lr(step, base_lr, warmup_steps)
    if schedule == "constant" or step < warmup_steps:
        return lr
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return lr * (1.0 - p if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * p)))


class EMA:
    """Exponential moving average of the weights: ema = ema - (1 - decay_n) (ema - p)."""

    def __init__(self, params: dict, decay: float = 0.9999, warmup: bool = True, *, ops=REFERENCE):
        self.decay = float(decay)
        if not 0.0 <= self.decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.warmup = bool(warmup)
        self.ops = ops  # ops.ema_update(...) is the rule; ops.arrange_params holds the average like the params
        self.num_updates = 0  # n, updates applied so far
        self.shadow = ops.arrange_params({k: p.copy() for k, p in params.items()})  # the averaged weights

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
        self.ops.ema_update(self.shadow, params, d)  # ema = ema - (1 - decay_n) (ema - p)
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
