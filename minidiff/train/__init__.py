"""Training, sampling and run files (trainer, generate, checkpoints, bundles, configs, reports).

`minidiff.train(cfg, data=...)` is the training function (trainer.train) and also the name of this package:
once the package is imported, `minidiff.train` is this module, so the module itself is callable and calls
trainer.train (the class swap below; PEP 549 was deferred, so this is the usual way).
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """trainer.train(cfg, stop_after=None, log=print, ops=REFERENCE, data=None)."""
        from .trainer import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
