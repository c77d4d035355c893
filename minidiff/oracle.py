"""`minidiff oracle --adapter module:object`: run every fixture against someone else's diffusion code.

The adapter is any object; each callable below is optional (a missing one is skipped and listed):

    schedule(beta_schedule, num_train_timesteps, beta_start, beta_end) -> dict with any of betas, alphas_cumprod,
        posterior_variance, posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2   (T,)
    add_noise(x0, noise, t) -> x_t                                    q(x_t | x_0); t an int
    posterior(x0, x_t, t) -> (mean, variance, log_variance)           q(x_{t-1} | x_t, x_0); variances broadcast
    ddpm_step(model_output, t, prev_t, sample, noise, prediction_type=, variance_type=, clip_sample=)
        -> prev_sample or (prev_sample, pred_original_sample)        (clip_sample_range 1)
    ddim_step(model_output, t, prev_t, sample, noise, eta=, prediction_type=, set_alpha_to_one=, clip_sample=)
        -> the same                                                   (use_clipped_model_output = clip_sample)
    timesteps(num_inference_steps, timestep_spacing, steps_offset) -> int (n,)
    prev_timesteps(timesteps, num_train_timesteps, num_inference_steps) -> int (n,); any negative = before the start
    timestep_embedding(t, dim, flip_sin_to_cos, downscale_freq_shift) -> (len(t), dim)    t float64 (6,)
    cfg(eps_uncond, eps_cond, guidance_scale) -> eps
    unet_forward(params, x, t) -> out;  unet_backward(params, x, t, dy) -> {"x": dx, <state-dict key>: grad}
                                                      (the 'tiny' U-Net; params: diffusers state-dict names)

Every case runs on the linear schedule, T = 1000, in float64 NumPy arrays. A callable that raises
NotImplementedError skips that case (an option it does not support); any other exception, a wrong
shape or dtype, or a NaN fails that case with one line, and the rest still run. Outputs may be NumPy
arrays, anything np.asarray takes, or torch tensors (.detach().cpu() is applied).

adapter.precision: "float64" (default), "float32_stored" (float64 math, float32 buffers) or "float32";
adapter.conventions: {name: value} from CONVENTIONS. When a case fails but its output matches a known
alternative convention, the report names it; it passes only if that convention was declared.
A guess never turns a failure into a pass. The tolerances are docs/oracle.md's section 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from .oracle_cases import build_cases

# name -> {value: the minidiff option that matches it}; the default (minidiff's choice) is not listed
CONVENTIONS = {
    "prev_timestep": {"t_minus_T_over_n": "ddim_prev_timesteps (DDIMScheduler's t - T // n)"},
    "guidance_scale": {"w": "guidance_scale_to_w: your scale is w = s - 1 (Ho & Salimans eq. 6)"},
    "flip_sin_to_cos": {True: "flip_sin_to_cos=True ([cos, sin])", False: "flip_sin_to_cos=False ([sin, cos])"},
    "downscale_freq_shift": {0: "downscale_freq_shift=0 (f_k with / half)", 1: "downscale_freq_shift=1 (/ (half-1))"},
    "variance_type": {"fixed_small": "variance_type='fixed_small' (beta~_t)",
                      "fixed_large": "variance_type='fixed_large' (beta_t)"},
    "posterior_log_variance_t0": {"floor_1e-20": "log(max(beta~_t, 1e-20)) (denoising-diffusion-pytorch)"},
    "timestep_spacing": {"truncated": "truncating_timesteps (int(linspace(-1, T-1, n+1)))"},
    "clip_sample": {True: "clip_sample=True", False: "clip_sample=False"},
    "set_alpha_to_one": {True: "set_alpha_to_one=True", False: "set_alpha_to_one=False"},
}
# precision -> kind -> (rel, abs): pass when max|out - ref| <= rel * max|ref| + abs  (docs/oracle.md section 2).
# float32 steps: at t <= 1, 1 - abar_t ~ 1e-4 and a float32 abar (rounded by 6e-8) moves beta' = 1 - abar_t / abar_prev
# by up to 6e-4 relative (2.9e-4 measured); the smallest classic bug (noise skipped at t = 1) shows at 6e-3.
TOLERANCES = {
    "float64": {"step": (1e-10, 0), "schedule": (1e-10, 0), "embedding": (1e-10, 1e-13), "cfg": (1e-12, 0),
                "int": (0, 0), "unet": (1e-10, 0), "grad": (1e-10, 1e-12)},
    "float32_stored": {"step": (1e-3, 0), "schedule": (1e-6, 0), "embedding": (1e-6, 1e-6), "cfg": (1e-6, 0),
                       "int": (0, 0), "unet": (1e-4, 0), "grad": (1e-4, 1e-6)},
    "float32": {"step": (1e-3, 0), "schedule": (1e-5, 0), "embedding": (0, 5e-4), "cfg": (1e-6, 0),
                "int": (0, 0), "unet": (1e-4, 0), "grad": (1e-4, 1e-6)},
}
FUNCTIONS = ("schedule", "add_noise", "posterior", "ddpm_step", "ddim_step", "timesteps", "prev_timesteps",
             "timestep_embedding", "cfg", "unet_forward", "unet_backward")


@dataclass
class Result:
    """One case's outcome: pass / fail / skip, its max abs and relative error against the tolerance, and why."""
    name: str
    function: str
    status: str  # "pass" | "fail" | "skip"
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    tolerance: tuple = (0.0, 0.0)
    message: str = ""
    convention: str = ""  # "name=value" when the output matches a known alternative


class OracleReport:
    """results: [Result]; missing: the adapter functions it lacks; ok: no case failed."""

    def __init__(self, results, missing, precision):
        self.results, self.missing, self.precision = results, missing, precision

    @property
    def failed(self):
        return [r for r in self.results if r.status == "fail"]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __getitem__(self, name) -> Result:
        return next(r for r in self.results if r.name == name)

    def table(self, failures_only=False) -> str:
        rows = [f"{'case':58s} {'max abs':>9s} {'max rel':>9s} {'tol rel':>8s} {'tol abs':>8s}  result"]
        for r in self.results:
            if failures_only and r.status != "fail":
                continue
            note = f"  {r.message}" if r.message else ""
            rows.append(f"{r.name:58s} {r.max_abs:9.2e} {r.max_rel:9.2e} {r.tolerance[0]:8.0e} "
                        f"{r.tolerance[1]:8.0e}  {r.status.upper()}{note}")
        n = {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}
        rows.append(f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped (precision {self.precision}); "
                    f"not provided by the adapter: {', '.join(self.missing) or 'none'}")
        return "\n".join(rows)


# ----------------------------------------------------------------------------- comparing one output


def _to_numpy(out):
    if hasattr(out, "detach"):  # a torch tensor, without importing torch
        out = out.detach().cpu().numpy()
    return np.asarray(out)


def _compare(out, ref, tol, broadcast):
    """(max_abs, max_rel, message): message is '' when out matches ref within tol = (rel, abs)."""
    ref = np.asarray(ref)
    if broadcast:
        try:
            out = np.broadcast_to(out, ref.shape)
        except ValueError:
            return np.inf, np.inf, f"shape {out.shape} does not broadcast to {ref.shape}"
    if out.shape != ref.shape:
        return np.inf, np.inf, f"shape {out.shape}, expected {ref.shape}"
    if np.issubdtype(ref.dtype, np.integer):
        if not np.issubdtype(out.dtype, np.integer):
            return np.inf, np.inf, f"dtype {out.dtype}, expected integers"
        out = np.where(out < 0, -1, out)  # any negative previous timestep means "before the start"
    elif not np.issubdtype(out.dtype, np.floating):
        return np.inf, np.inf, f"dtype {out.dtype}, expected floating point"
    out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
    if not np.all(np.isfinite(out64)) and np.all(np.isfinite(ref64)):
        return np.inf, np.inf, "returned NaN or inf"
    with np.errstate(invalid="ignore"):
        err = float(np.abs(out64 - ref64).max(initial=0.0))
    scale = float(np.abs(ref64).max(initial=0.0))
    rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
    ok = err <= tol[0] * scale + tol[1]
    return err, rel, "" if ok else "differs"


def _compare_all(outs, expected, tol, broadcast):
    worst_abs, worst_rel, msg = 0.0, 0.0, ""
    for field, ref in expected.items():
        if field not in outs:
            continue
        a, r, m = _compare(outs[field], ref, tol, field in broadcast)
        worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
        if m and not msg:
            msg = m if m == "differs" else f"{field}: {m}"
    return worst_abs, worst_rel, msg


def _outputs(case, out):
    """Map the adapter's return value onto the case's fields."""
    fields = list(case.expected)
    if case.function == "unet_backward" or case.function == "schedule":
        if not isinstance(out, dict):
            raise TypeError(f"{case.function} must return a dict, got {type(out).__name__}")
        unknown = sorted(set(out) - set(fields))
        if case.function == "schedule" and unknown:
            raise KeyError(f"unknown schedule fields {unknown}; known: {fields}")
        return {k: _to_numpy(v) for k, v in out.items() if k in case.expected}
    if isinstance(out, (tuple, list)) and case.kind != "int":
        if len(out) > len(fields):
            raise ValueError(f"returned {len(out)} values, expected at most {len(fields)} ({', '.join(fields)})")
        return {f: _to_numpy(o) for f, o in zip(fields, out)}
    return {fields[0]: _to_numpy(out)}


def run_case(adapter, case, precision, conventions) -> Result:
    """Run one case through the adapter and compare its outputs with the fixture at precision's tolerance."""
    tol = TOLERANCES[precision][case.kind]
    res = Result(case.name, case.function, "pass", tolerance=tol)
    try:
        outs = _outputs(case, getattr(adapter, case.function)(*case.args, **case.kwargs))
        if not outs:
            raise ValueError(f"returned none of the fields {list(case.expected)}")
    except NotImplementedError as e:
        res.status, res.message = "skip", f"not implemented: {e}".rstrip(": ")
        return res
    except Exception as e:  # the adapter's error is this case's failure, in one line
        res.status = "fail"
        res.message = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return res
    if precision == "float64":
        for f, o in outs.items():
            if np.issubdtype(o.dtype, np.floating) and o.dtype != np.float64:
                res.status, res.message = "fail", f"{f}: dtype {o.dtype} with precision 'float64' (declare the precision)"
                return res
    res.max_abs, res.max_rel, msg = _compare_all(outs, case.expected, tol, case.broadcast)
    if not msg:
        return res
    res.status, res.message = "fail", msg
    if msg != "differs":
        return res
    for name, value, compute in case.alternatives:
        if _compare_all(outs, {**case.expected, **compute()}, tol, case.broadcast)[2]:
            continue
        res.convention = f"{name}={value!r}"
        if name in conventions and conventions[name] == value:
            res.status, res.message = "pass", f"under the declared convention {res.convention}"
        else:
            res.message = (f"matches the convention {res.convention}: {CONVENTIONS[name][value]}; declare "
                           f"adapter.conventions[{name!r}] = {value!r} to accept it")
        break
    return res


# ----------------------------------------------------------------------------- running every case


def check(adapter, fixtures=None, precision=None, conventions=None) -> OracleReport:
    """Run every fixture case the adapter has a function for. fixtures: {group: {key: array}} (default:
    built in memory by fixtures.build_fixtures); precision / conventions override the adapter's attributes."""
    precision = precision or getattr(adapter, "precision", "float64")
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {list(TOLERANCES)}, got {precision!r}")
    conventions = dict(getattr(adapter, "conventions", {}) if conventions is None else conventions)
    for name, value in conventions.items():
        if name not in CONVENTIONS or value not in CONVENTIONS[name]:
            raise ValueError(f"unknown convention {name}={value!r}; known: "
                             + "; ".join(f"{k}: {list(v)}" for k, v in CONVENTIONS.items()))
    present = [f for f in FUNCTIONS if callable(getattr(adapter, f, None))]
    missing = [f for f in FUNCTIONS if f not in present]
    results = [run_case(adapter, c, precision, conventions) for c in build_cases(present, fixtures)]
    return OracleReport(results, missing, precision)


def load_adapter(spec: str):
    """'module:object' -> the object (a class is instantiated with no arguments)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"--adapter must be module:object, got {spec!r}")
    try:
        obj = getattr(importlib.import_module(module), name)
    except SyntaxError:
        raise  # the command line names its file and line
    except Exception as e:  # not found, or the adapter's module raised while it was imported
        raise ValueError(f"--adapter {spec}: {type(e).__name__}: {e}") from None
    return obj() if isinstance(obj, type) else obj


def add_oracle_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("oracle", help="check another implementation's functions against every fixture "
                                             "(see docs/oracle.md)")
    p.add_argument("--adapter", required=True, metavar="MODULE:OBJECT", help="the adapter (see minidiff/oracle.py)")
    p.add_argument("--precision", choices=list(TOLERANCES), default=None, help="overrides adapter.precision")
    p.add_argument("--failures-only", action="store_true", help="print only the failing cases and the summary")
    p.set_defaults(func=cmd_oracle)
    return p


def cmd_oracle(args) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:  # the console script finds ./adapter.py, as python -m does
        sys.path.insert(0, os.getcwd())
    report = check(load_adapter(args.adapter), precision=args.precision)
    print(report.table(args.failures_only))
    return 0 if report.ok else 1

