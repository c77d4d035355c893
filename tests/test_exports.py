"""Every name minidiff/__init__.py exports resolves to the object in its module; `import minidiff` stays light."""

import subprocess
import sys

import minidiff


def test_every_export_resolves():
    for name, module in minidiff._WHERE.items():
        obj = getattr(minidiff, name)
        assert obj is getattr(__import__(f"minidiff.{module}", fromlist=[name]), name), name
    assert set(dir(minidiff)) >= set(minidiff._WHERE)


def test_import_is_light_and_unet_apply_returns_only_the_output():
    code = "import sys, minidiff; print(sorted(m for m in sys.modules if m.startswith('minidiff.')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    import numpy as np
    config = minidiff.get_preset("tiny")
    params = minidiff.init_params(config, seed=0, dtype=np.float64)
    x = np.random.default_rng(0).standard_normal((1, config.in_channels, 8, 8))
    out = minidiff.unet_apply(params, config, x, np.array([3]))
    np.testing.assert_array_equal(out, minidiff.unet_forward(params, config, x, np.array([3]))[0])
