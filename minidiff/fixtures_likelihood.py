"""Fixtures of the variational bound (diffusion/likelihood.py, vlb.py) and the hybrid loss, for `minidiff fixtures`.

Keys (linear schedule, T = 1000, float64, 8-bit x0 with both edge levels, one t per case for the whole batch):
    kl.{mean1, logvar1, mean2, logvar2, kl, dkl_dlogvar2}
    decoder.{x, means, log_scales, log_probs, dlog_probs_dlog_scales}
    vb.<variance_type>.t<t>.{x0, x_t, t, model_output, output (N,), pred_xstart[, dvar]}   (clip_denoised False)
    prior.{x0, prior_bpd}
    hybrid.{x0, noise, t, model_output, vlb_weight, loss, dmodel_output}   (learned_range, epsilon)
Shape legend: N = 2 items, C = 2 channels, H = W = 3.
"""

from __future__ import annotations

import numpy as np

from .diffusion.likelihood import discretized_gaussian_log_likelihood_dlogscale, normal_kl, normal_kl_dlogvar2
from .diffusion.loss import hybrid_loss
from .diffusion.schedule import add_noise, make_schedule
from .diffusion.vlb import VLB_VARIANCE_TYPES, prior_bpd, vb_terms_bpd
from .fixtures_model import _rng, _scalar

T = 1000
SHAPE = (2, 2, 3, 3)
VB_TIMESTEPS = (0, 1, 500, 999)


def _data8(rng, shape):
    x = rng.integers(0, 256, shape) / 127.5 - 1.0
    x.reshape(-1)[:2] = [-1.0, 1.0]
    return x


def likelihood_fixtures() -> dict:
    """The bound's terms at several t for every variance type, its pieces and the hybrid loss with its gradient."""
    s, rng, out = make_schedule(T), _rng("likelihood"), {}
    m1, lv1, m2, lv2 = (rng.standard_normal(SHAPE) for _ in range(4))
    out.update({"kl.mean1": m1, "kl.logvar1": lv1, "kl.mean2": m2, "kl.logvar2": lv2,
                "kl.kl": normal_kl(m1, lv1, m2, lv2), "kl.dkl_dlogvar2": normal_kl_dlogvar2(m1, lv1, m2, lv2)})
    x = _data8(rng, SHAPE)
    log_scales = rng.uniform(-6, -2, SHAPE)
    means = x + np.exp(log_scales) * rng.standard_normal(SHAPE)
    lp, dlp = discretized_gaussian_log_likelihood_dlogscale(x, means, log_scales)
    out.update({"decoder.x": x, "decoder.means": means, "decoder.log_scales": log_scales,
                "decoder.log_probs": lp, "decoder.dlog_probs_dlog_scales": dlp})
    for vt in VLB_VARIANCE_TYPES:
        for t in VB_TIMESTEPS:
            x0 = _data8(rng, SHAPE)
            x_t = add_noise(s, x0, rng.standard_normal(SHAPE), t)
            model_output = rng.standard_normal(SHAPE)
            if vt == "learned":
                model_output = np.concatenate([model_output, np.exp(rng.uniform(-9, -3, SHAPE))], axis=1)
            elif vt == "learned_range":
                model_output = np.concatenate([model_output, rng.uniform(-1, 1, SHAPE)], axis=1)
            res = vb_terms_bpd(s, model_output, x0, x_t, t, vt, with_grad=vt.startswith("learned"))
            key = f"vb.{vt}.t{t}"
            out.update({f"{key}.x0": x0, f"{key}.x_t": x_t, f"{key}.t": _scalar(t),
                        f"{key}.model_output": model_output, f"{key}.output": res["output"],
                        f"{key}.pred_xstart": res["pred_xstart"]})
            if "dvar" in res:
                out[f"{key}.dvar"] = res["dvar"]
    x0 = _data8(rng, SHAPE)
    out.update({"prior.x0": x0, "prior.prior_bpd": prior_bpd(s, x0)})
    x0, noise, t = _data8(rng, SHAPE), rng.standard_normal(SHAPE), np.array([0, 700])
    model_output = np.concatenate([rng.standard_normal(SHAPE), rng.uniform(-1, 1, SHAPE)], axis=1)
    loss, dout = hybrid_loss(s, model_output, x0, noise, t, vlb_weight=0.001)
    out.update({"hybrid.x0": x0, "hybrid.noise": noise, "hybrid.t": t, "hybrid.model_output": model_output,
                "hybrid.vlb_weight": _scalar(0.001), "hybrid.loss": _scalar(float(loss)), "hybrid.dmodel_output": dout})
    return out
