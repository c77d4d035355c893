"""Issue 17 items 1 and 7 (loaders): 16-bit gray PNGs are scaled to 8 bits (round(v * 255 / 65535)), not clipped;
labels are 0..K-1 with K <= MAX_CLASSES, checked before any per-class allocation."""

import numpy as np
from PIL import Image

from minidiff.data.loaders import load_folder


def test_issue17_a_16_bit_gradient_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    for i in range(2):
        Image.fromarray(ramp).save(tmp_path / f"g{i}.png")
    with Image.open(tmp_path / "g0.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16 bits
    data = load_folder(tmp_path)
    expected = (ramp.astype(np.int64) * 255 + 32767) // 65535
    np.testing.assert_array_equal(data.data[0, 0], expected)  # the uint8 store
    assert (expected == 255).mean() < 0.05


def test_issue17_a_label_past_the_class_bound_is_one_line(tmp_path, capsys):
    import pytest

    from minidiff.cli import main
    from minidiff.data.dataset import MAX_CLASSES, ArrayDataset

    images = np.zeros((8, 1, 8, 8), np.uint8)
    for big in (MAX_CLASSES, 100_000, 2**40):
        labels = np.arange(8, dtype=np.int64)
        labels[3] = big
        with pytest.raises(ValueError, match=f"a label of {big} .*K <= {MAX_CLASSES}"):
            ArrayDataset(images, labels, name="x")
    np.savez(tmp_path / "big.npz", images=images, labels=np.full(8, 100_000))
    assert main(["train", "--data", str(tmp_path / "big.npz"), "--out", str(tmp_path / "run"), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "100000" in err[0] and str(MAX_CLASSES) in err[0]
