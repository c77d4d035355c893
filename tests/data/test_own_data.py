"""Your own data (issue 20): .npz layouts and float images, class names, --resolution with center or
random crops, non-square images, and what --conditioning auto picks for each kind of data."""

import numpy as np
import pytest
from PIL import Image

from minidiff.data import load_dataset
from minidiff.data.npz import images_to_nchw_u8
from minidiff.data.resize import MAX_RESOLUTION, check_resolution
from minidiff.training.bundle import choose_conditioning


def rand_u8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_npz_layouts_and_float_images_give_the_same_data(tmp_path):
    nhwc = rand_u8(5, 8, 8, 3)
    np.savez(tmp_path / "a.npz", images=nhwc)
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2))  # NCHW
    np.savez(tmp_path / "c.npz", images=nhwc.astype(np.float32) / 255)  # float in [0, 1]
    a, b, c = (load_dataset(str(tmp_path / f"{k}.npz")).data for k in "abc")
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(a, nhwc.transpose(0, 3, 1, 2))


def test_class_names_become_captions_and_auto_picks_text(tmp_path):
    np.savez(tmp_path / "d.npz", images=rand_u8(4, 8, 8), labels=np.array([0, 1, 1, 0]),
             class_names=np.array(["cat", "Golden_Retriever"]))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert ds.class_names == ["cat", "Golden_Retriever"] and ds.captions[1] == "golden retriever"
    assert choose_conditioning("auto", ds) == "text"


def test_labels_only_npz_trains_class_conditioned_and_a_flat_folder_unconditionally(tmp_path):
    np.savez(tmp_path / "l.npz", images=rand_u8(4, 8, 8), labels=np.array([0, 1, 2, 0]))
    ds = load_dataset(str(tmp_path / "l.npz"))
    assert choose_conditioning("auto", ds) == "class" and ds.class_names == ["0", "1", "2"]
    assert choose_conditioning("text", ds) == "text"  # still possible when asked for
    for i in range(3):
        Image.fromarray(rand_u8(8, 8, 3, seed=i)).save(tmp_path / f"{i}.png")
    flat = load_dataset(str(tmp_path))
    assert flat.labels is None and choose_conditioning("auto", flat) == "none"


@pytest.mark.parametrize("arrays, match", [
    ({"class_names": np.array(["a", "b"])}, "needs labels"),
    ({"labels": np.array([0, 1, 2, 0]), "class_names": np.array(["a", "b"])}, "has 2 names but the labels name 3"),
    ({"labels": np.array([0, 1, 1, 0]), "class_names": np.array([1, 2])}, "array of strings"),
    ({"images": np.full((4, 8, 8), -0.5)}, r"in \[0, 1\]"),
    ({"images": rand_u8(4, 2, 8, 8)}, "NHWC or NCHW"),
])
def test_npz_bad_input_is_one_line(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **({"images": rand_u8(4, 8, 8)} | arrays))
    with pytest.raises(ValueError, match=match) as err:
        load_dataset(str(tmp_path / "bad.npz"))
    assert "\n" not in str(err.value)


def test_resolution_center_and_random_crops_of_non_square_images(tmp_path):
    wide = rand_u8(3, 8, 12, 3)  # NHWC: 8 high, 12 wide
    np.savez(tmp_path / "w.npz", images=wide)
    center = load_dataset(str(tmp_path / "w.npz"))  # no --resolution: the centered 8 x 8 square
    np.testing.assert_array_equal(center.data, wide[:, :, 2:10].transpose(0, 3, 1, 2))
    assert load_dataset(str(tmp_path / "w.npz"), image_size=4).data.shape == (3, 3, 4, 4)
    r1 = load_dataset(str(tmp_path / "w.npz"), image_size=8, random_crop=True, seed=1).data
    r1b = load_dataset(str(tmp_path / "w.npz"), image_size=8, random_crop=True, seed=1).data
    np.testing.assert_array_equal(r1, r1b)  # drawn from --seed: the same crops again
    offsets = [next(o for o in range(5) if np.array_equal(r1[i], wide[i, :, o:o + 8].transpose(2, 0, 1)))
               for i in range(3)]
    assert len(set(offsets)) > 1 or offsets[0] != 2  # not all centered


@pytest.mark.parametrize("bad", [0, -3, MAX_RESOLUTION + 1, 2.5, True])
def test_resolution_out_of_range_is_one_line(bad):
    with pytest.raises(ValueError, match=r"--resolution must be an integer in \[1, 512\]"):
        check_resolution(bad)
    with pytest.raises(ValueError, match="--resolution"):
        load_dataset("shapes16", image_size=bad)


def test_images_to_nchw_u8_rule():
    x = rand_u8(2, 3, 5, 3)  # last axis 3 -> NHWC wins (stated rule)
    assert images_to_nchw_u8(x, "x").shape == (2, 3, 3, 5)
    assert images_to_nchw_u8(rand_u8(2, 1, 5, 5), "x").shape == (2, 1, 5, 5)
