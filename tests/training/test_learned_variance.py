"""--variance-type learned_range end to end on the tiny preset: 2C outputs, a finite hybrid loss, the same numbers
on the reference and the fast ops, DDPM sampling with the learned variance, `minidiff eval --nll`, and one line
for a resume with the wrong output channels. The default call of loss_and_grads is the one it always was."""

import json

import numpy as np
import pytest

from minidiff.cli import main
from minidiff.diffusion.sampler import sample
from minidiff.fast.ops import fast_ops
from minidiff.nll import evaluate_nll
from minidiff.nn.ops import REFERENCE
from minidiff.training.config import TrainConfig, validate_train_config
from minidiff.training.trainer import Trainer, learned_variance_args, train

from tiny_runs import quiet, tiny_config


def tiny_cfg(out, **kw):
    return tiny_config(out, **(dict(steps=3, batch_size=4, save_every=3, sample_steps=2, warmup_steps=1,
                                    num_train_timesteps=50, variance_type="learned_range") | kw))


def test_the_default_training_call_is_unchanged():
    assert learned_variance_args(TrainConfig()) == {}
    assert learned_variance_args(TrainConfig(variance_type="fixed_large")) == {}


def test_learned_range_run_trains_samples_and_reports_bits_per_dim(tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_cfg(out, threads=1), log=quiet, ops=REFERENCE)
    assert len(summary["losses"]) == 3 and np.all(np.isfinite(summary["losses"]))
    fast = train(tiny_cfg(tmp_path / "fast", threads=2, shards="threads"), log=quiet, ops=fast_ops(2, "threads"))
    np.testing.assert_allclose(fast["losses"], summary["losses"], rtol=1e-5)
    trainer = Trainer(tiny_cfg(out, resume=True, steps=3), log=quiet)
    assert trainer.model_config.out_channels == 6
    b = trainer.bundle()
    assert b.sampler_options["variance_type"] == "learned_range"
    # DDPM sampling uses the predicted variance: with v forced to -1 it is fixed_small's (beta~_t), else not
    shape = (2, 3, 8, 8)
    kw = dict(sampler="ddpm", seed=3)
    learned = sample(b.model_fn, shape, b.schedule, variance_type="learned_range", **kw)

    def at_min(x, t, c):
        o = b.model_fn(x, t, c)
        return np.concatenate([o[:, :3], -np.ones_like(o[:, 3:])], axis=1)
    small = sample(lambda x, t, c: b.model_fn(x, t, c)[:, :3], shape, b.schedule, variance_type="fixed_small", **kw)
    np.testing.assert_allclose(sample(at_min, shape, b.schedule, variance_type="learned_range", **kw), small,
                               rtol=1e-4, atol=1e-4)
    assert np.abs(learned - small).max() > 1e-3
    # bits/dim: the bound over all 50 timesteps, and the CLI's strided estimate
    res = evaluate_nll(out, n=3, batch_size=2, reference=True, log=quiet)
    assert res["n"] == 3 and res["variance_type"] == "learned_range" and np.isfinite(res["bits_per_dim"])
    assert res["bits_per_dim"] > 0 and len(res["vb_per_t"]) == 50
    assert main(["eval", "--nll", "--checkpoint", str(out), "--n", "2", "--nll-timesteps", "5", "--reference",
                 "--out", str(tmp_path / "e")]) == 0
    saved = json.loads((tmp_path / "e" / "nll.json").read_text())
    assert saved["kind"].startswith("strided estimate (6 of 50") and len(saved["timesteps"]) == 6


def test_fixed_variance_runs_get_bits_per_dim_too(tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(out, variance_type="fixed_large", steps=1, save_every=1), log=quiet)
    res = evaluate_nll(out, n=2, reference=True, timesteps=4, log=quiet)
    assert res["variance_type"] == "fixed_large" and np.isfinite(res["bits_per_dim"])


def test_bad_variance_options_get_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="use learned_range"):
        validate_train_config(TrainConfig(variance_type="learned"))
    with pytest.raises(ValueError, match="--variance-type must be one of"):
        validate_train_config(TrainConfig(variance_type="large"))
    with pytest.raises(ValueError, match="--vlb-weight"):
        validate_train_config(TrainConfig(vlb_weight=-1.0))
    out = tmp_path / "run"
    train(tiny_cfg(out, variance_type="fixed_small", steps=1, save_every=1), log=quiet)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--preset", "tiny", "--steps", "2", "--batch-size", "4",
                 "--num-train-timesteps", "50", "--variance-type", "learned_range", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "out_channels=3" in err[0] and "out_channels=6" in err[0]
