"""Short training runs of the tiny preset for the training tests: one config builder and a silent log.

    tiny_config(out, **fields)   TrainConfig(out, preset "tiny", no sample grids, a log line per step, lr 1e-3,
                                 then fields: each test file passes its own steps, batch, save and warm-up)
"""

from minidiff.training.config import TrainConfig

TINY_RUN = dict(preset="tiny", sample_every=0, log_every=1, lr=1e-3)


def tiny_config(out, **fields) -> TrainConfig:
    """A TrainConfig writing to out: TINY_RUN, overridden by fields."""
    return TrainConfig(**({"out": str(out)} | TINY_RUN | fields))


def quiet(*a, **k):
    """A log function that prints nothing."""
